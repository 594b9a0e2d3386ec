"""Problems: what the scripts analyse and train -- a model, its data, its forward pass and its
loss -- behind one seam.

* ``base``   -- the contract (``Problem``: ``model()``, ``dataset(split)``, ``forward``,
  ``loss``, optional ``accuracy``, ``train_dataset``, ``recipe``) and ``check_problem``, the
  checks a problem must pass before any worker starts;
* ``files``  -- ``FileProblem``: your own problem in one small Python file (``--problem F``);
* ``images`` -- ``ImageProblem``: the built-in image classifier (CIFAR-10/100, ImageFolder,
  synthetic; the original's ResNet or ``--model module:callable``);
* ``select`` -- which problem a command line or a checkpoint means, and its model.

Data flows one way: script -> problem -> data shards -> operator -> estimator -> result.
"""
from .base import Problem, ProblemError, check_curvatures, check_problem
from .files import FileProblem
from .images import ImageProblem, describe_arch, image_record
from .select import (
    BUILTIN_FLAGS,
    analysis_problem,
    build_model,
    file_problem_of_record,
    load_checkpoint,
    training_problem,
)

__all__ = ["BUILTIN_FLAGS", "FileProblem", "ImageProblem", "Problem", "ProblemError",
           "analysis_problem", "build_model", "check_curvatures", "check_problem", "describe_arch",
           "file_problem_of_record", "image_record", "load_checkpoint", "training_problem"]
