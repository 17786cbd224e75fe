# The cell-mask ControlNet on PixCell-1024 (1024 px images and masks, 16 UNI tokens per image in 4 x 4 tiles):
#   accelerate launch train_scripts/train_controlnet.py configs/controlnet/pixcell_1024_cell.py \
#       --work-dir work_dirs/cell_controlnet_1024 --images data/cells_1024/images --masks data/cells_1024/masks
# The published recipe of the 256 px ControlNet (configs/_base_/controlnet.py) at 1024 px: no published 1024 px
# ControlNet exists, so the step count and batch are a starting point, not a reproduction.
_base_ = ["../_base_/controlnet.py"]

model = "PixCell-XL/2-1024"
resolution = 1024
base_model = "StonyBrook-CVLab/PixCell-1024"
train_batch_size = 1  # 4096 tokens per image: 16x the 256 px model's
gradient_accumulation_steps = 4  # the published batch of 4
gradient_checkpointing = True
