# Distil PixCell-256 into a 4-step student (full weights), guidance 1..3 built in.
_base_ = ["../_base_/distill.py"]

teacher = "StonyBrook-CVLab/PixCell-256"
