"""Exceptions raised by sparsecc. Every message names the offending input and the fix."""


class SparseccError(Exception):
    """Base class of sparsecc's errors."""


class RecipeError(SparseccError, ValueError):
    """A recipe or config is malformed: unknown key, bad value, pattern matching nothing."""


class CalibrationError(SparseccError, ValueError):
    """Calibration batches are unusable (empty, wrong dtype/device/shape) or produce NaN/Inf."""


class CaptureError(SparseccError, RuntimeError):
    """The model could not be captured, or has nothing sparsecc can rewrite."""


class PipelineError(SparseccError, RuntimeError):
    """A pipeline is ill-formed (cycle, missing producer) or one of its passes failed."""


class PlanError(SparseccError, ValueError):
    """A saved plan is missing, corrupt, or does not fit the model it is applied to."""


class WholeModelError(RecipeError):
    """A recipe needs the whole model in memory (it cannot be carried out block by block by `prune_folder`)."""


class DistributedError(SparseccError, RuntimeError):
    """A distributed run (torch.distributed, world size > 1) cannot go on: the ranks were given
    different batches, a pass cannot be sharded yet, or another rank failed."""


class FinetuneError(SparseccError, ValueError):
    """A fine-tuning run cannot start or resume: bad settings, a model with nothing pruned, a
    checkpoint folder of another run."""
