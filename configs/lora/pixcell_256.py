# LoRA on PixCell-256 over your extracted features: python train_scripts/train_lora.py configs/lora/pixcell_256.py \
#     --load-from StonyBrook-CVLab/PixCell-256 --data-root /data/patches --work-dir work_dirs/lora_256
_base_ = ["../_base_/lora.py"]

load_from = "StonyBrook-CVLab/PixCell-256"
