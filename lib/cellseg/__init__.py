"""cellseg: fine-tune a pathology foundation model (UNI / any timm encoder) with a HoVer-Net-style decoder for cell
instance segmentation and classification, from notebooks that run the same in Jupyter and headless on SLURM."""

__version__ = "0.1.0"
