__version__ = "0.0.1"
# The public API at the top level: `sslkd.run` and `sslkd.compare`, the data, the evaluation, the method contract and
# the methods. The submodules stay importable by name (`from sslkd import ibot_rkd`). The notebooks in nbs/ build
# every name below; this file only gathers them.
from .data import ImageData, DeviceLoader, load_dataset
from .evaluate import extract_features, knn_accuracy, linear_probe, evaluate_backbone
from .metrics import collapse_signals
from .device import resolve_device, precision
from .train import Method, TrainConfig, fit
from .dino import DINO, DINOConfig
from .ibot import iBOT, iBOTConfig
from .ibot_rkd import iBOTRKD, iBOTRKDConfig
from .multiteacher import MultiTeacher, MultiTeacherConfig
from .contrastive import SimCLR, SimCLRConfig, MoCo, MoCoConfig, BYOL, BYOLConfig
from .mae import MAE, MAEConfig
from .distill import KASSL, KASSLConfig
from .registry import METHODS, ARCHS, register_method, build_backbone, load_method
from .runner import run, RunResult, compare, evaluate_checkpoint, PRESETS
from .plan import plan, Plan
