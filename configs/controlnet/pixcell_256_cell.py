# The published PixCell-256 cell-mask ControlNet recipe on your (image, mask) folders:
#   accelerate launch train_scripts/train_controlnet.py configs/controlnet/pixcell_256_cell.py \
#       --work-dir work_dirs/cell_controlnet --images data/lizard/images --masks data/lizard/masks
_base_ = ["../_base_/controlnet.py"]
