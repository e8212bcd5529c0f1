"""Files: atomic writes, output directories, training checkpoints and pickle-free model
directories (one module each; the names below are the ones callers use).

* :mod:`.atomic` -- writes that readers see complete or not at all;
* :mod:`.output_dir` and :mod:`.run_dir` -- who may write a directory, and what a run
  leaves behind when it fails;
* :mod:`.checkpoints` -- training checkpoints loaded with ``weights_only=True``;
* :mod:`.module_specs`, :mod:`.architecture`, :mod:`.model_dir` -- a model as safetensors
  plus ``architecture.json``, checked on load by :mod:`.file_checks` and :mod:`.file_limits`;
  :mod:`.user_model` -- the same for a model of any class, rebuilt onto a fresh instance;
* :mod:`.legacy` -- state_dict files and opt-in ``torch.save`` pickles.
"""

from ..errors import CheckpointError, OutputInUseError
from .architecture import (
    ARCHITECTURE_FILE,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    WEIGHTS_FILE,
    describe_architecture,
)
from .atomic import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    to_json,
)
from .checkpoints import load_checkpoint, save_checkpoint
from .legacy import load_model_file
from .model_dir import (
    build_architecture,
    input_shape_of,
    is_model_dir,
    load_model,
    load_or_create,
    save_model,
)
from .module_specs import ModuleType, register_module_type
from .output_dir import (
    check_output_dir,
    lock_output_dir,
    prepare_output_dir,
    remove_stale_temp_files,
)

__all__ = [
    "ARCHITECTURE_FILE",
    "MODEL_FORMAT",
    "MODEL_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "CheckpointError",
    "ModuleType",
    "OutputInUseError",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "build_architecture",
    "check_output_dir",
    "describe_architecture",
    "input_shape_of",
    "is_model_dir",
    "load_checkpoint",
    "load_model",
    "load_model_file",
    "load_or_create",
    "lock_output_dir",
    "prepare_output_dir",
    "register_module_type",
    "remove_stale_temp_files",
    "save_checkpoint",
    "save_model",
    "to_json",
]
