"""Contrastive and joint-embedding tasks: instance discrimination (exemplar: SimCLR/NT-Xent, DCL), BYOL, SimSiam, Barlow Twins, VICReg, DINO, SwAV."""
