"""Models: an ADM-style U-Net, the digits classifier, safetensors I/O, adapters, shipped weights.

    unet.py        UNet, UNetConfig: `model(x, t, class_labels=y)`, null class = num_classes
    classifier.py  DigitsClassifier: judges digit samples (accuracy, Fréchet distance)
    digits.py      scikit-learn's 8x8 digits as [-1, 1] images
    io.py          save_model / load_model: safetensors + JSON config, never pickle
    adapters.py    adapt(): diffusers UNets and any callable -> `model(x, t, **cond) -> tensor`
    pretrained.py  load_pretrained("digits" or a .safetensors path): shipped weights in weights/
"""
from .adapters import CallableDenoiser, DiffusersUNet, adapt
from .classifier import DigitsClassifier, DigitsClassifierConfig
from .io import LoadedModel, ModelFileError, load_model, save_model
from .pretrained import Pretrained, load_pretrained, weights_path
from .unet import UNet, UNetConfig

__all__ = [
    "CallableDenoiser", "DiffusersUNet", "DigitsClassifier", "DigitsClassifierConfig", "LoadedModel",
    "ModelFileError", "Pretrained", "UNet", "UNetConfig", "adapt", "load_model",
    "load_pretrained", "save_model", "weights_path",
]
