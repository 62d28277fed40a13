"""Offline weights. Nothing here downloads: the Hugging Face offline switches are set before any
hub-aware library is imported, and a weights file or folder that is missing fails at once with a
message naming it, where it is published, and the flag and environment variable that take it."""

import os
from dataclasses import dataclass
from pathlib import Path

HUB_OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def go_offline() -> None:
    """Sets the hub offline switches (huggingface_hub reads them when first imported, so call
    this before importing diffusers or transformers)."""
    for name, value in HUB_OFFLINE_SWITCHES.items():
        os.environ[name] = value


@dataclass(frozen=True)
class Weights:
    """One kind of local weights: what it is, the file or folder expected, where it is published,
    and the flag / environment variable that take its path."""
    what: str
    expected: str
    published: str
    flag: str
    env: str
    folder: bool = False

    def path(self, given: str | os.PathLike | None) -> Path:
        """The local path from `given`, else from the environment variable; raises
        FileNotFoundError naming everything a user needs when neither points at one, and
        ValueError for an empty (0-byte) weights file."""
        source = f"{self.flag} {given}" if given else None
        if not given and os.environ.get(self.env):
            given, source = os.environ[self.env], f"${self.env}={os.environ[self.env]}"
        kind = "folder" if self.folder else "file"
        how = (f"Download {self.expected} from {self.published} on a machine with internet "
               f"access, then pass its path with {self.flag} PATH or set {self.env}=PATH "
               "(nothing is downloaded at run time).")
        if not given:
            raise FileNotFoundError(f"no {self.what} given: {how}")
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{self.what} {kind} {str(path)!r} (from {source}) does not "
                                    f"exist. {how}")
        if self.folder and not path.is_dir():
            raise NotADirectoryError(f"{self.what} {str(path)!r} (from {source}) is a file; "
                                     f"expected a folder ({self.expected}). {how}")
        if not self.folder and path.is_dir():
            raise IsADirectoryError(f"{self.what} {str(path)!r} (from {source}) is a folder; "
                                    f"expected a file ({self.expected}). {how}")
        if not self.folder and path.stat().st_size == 0:   # a failed download, say
            raise ValueError(f"{self.what} file {str(path)!r} (from {source}) is empty (0 "
                             f"bytes); expected {self.expected}. {how}")
        return path


INCEPTION = Weights(
    what="Inception-v3 FID weights", expected="weights-inception-2015-12-05-6726825d.pth",
    published="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
              "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's TF-ported FID "
              "Inception)",
    flag="--inception-weights", env="PTDIT_INCEPTION_WEIGHTS")
CLIP = Weights(
    what="CLIP weights", expected="an OpenAI CLIP checkpoint such as ViT-B-32.pt or ViT-L-14.pt",
    published="https://openaipublic.azureedge.net/clip/models/ (the URLs listed in "
              "clip-anytorch's clip/clip.py _MODELS)",
    flag="--clip-weights", env="PTDIT_CLIP_WEIGHTS")
VAE = Weights(
    what="VAE", expected="a diffusers AutoencoderKL folder (config.json + "
                         "diffusion_pytorch_model.safetensors)",
    published="https://huggingface.co/stabilityai/sd-vae-ft-ema (DiT, PT-DiT) or the vae/ "
              "folder of https://huggingface.co/PixArt-alpha/PixArt-XL-2-1024-MS",
    flag="--vae", env="PTDIT_VAE", folder=True)
T5 = Weights(
    what="T5 text encoder", expected="a transformers T5EncoderModel folder with its tokenizer "
                                     "(config.json, spiece.model, model weights)",
    published="https://huggingface.co/DeepFloyd/t5-v1_1-xxl or the text_encoder/ and "
              "tokenizer/ folders of https://huggingface.co/PixArt-alpha/PixArt-XL-2-1024-MS",
    flag="--t5", env="PTDIT_T5", folder=True)
