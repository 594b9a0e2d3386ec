"""Problems: what the scripts analyse and train -- a model, its data, its forward pass and its
loss -- behind one seam.

* ``base``   -- the contract (``Problem``: ``model()``, ``dataset(split)``, ``forward``,
  ``loss``, optional ``accuracy``, ``train_dataset``, ``recipe``) and ``check_problem``, the
  checks a problem must pass before any worker starts;
* ``files``  -- ``FileProblem``: your own problem in one small Python file (``--problem F``);
* ``images`` -- ``ImageProblem``: the built-in image classifier (CIFAR-10/100, ImageFolder,
  synthetic; the original's ResNet or ``--model module:callable``);
* ``text``   -- ``TextProblem``: the built-in language model (a small GPT on the bytes of a
  UTF-8 text file; ``--model gpt --dataset text``) and the generated demo text;
* ``select`` -- which problem a command line or a checkpoint means, and its model.

Data flows one way: script -> problem -> data shards -> operator -> estimator -> result.
"""
from .base import Problem, ProblemError, check_curvatures, check_problem
from .files import FileProblem
from .images import ImageProblem, describe_arch, image_record
from .select import (
    BUILTIN_FLAGS,
    DATASET_CHOICES,
    GPT_MODEL,
    analysis_problem,
    build_model,
    file_problem_of_record,
    load_checkpoint,
    training_problem,
)
from .text import TextProblem, generated_text, gpt_arch, text_record, write_generated_text

__all__ = ["BUILTIN_FLAGS", "DATASET_CHOICES", "GPT_MODEL", "FileProblem", "ImageProblem",
           "Problem", "ProblemError", "TextProblem", "analysis_problem", "build_model",
           "check_curvatures", "check_problem", "describe_arch", "file_problem_of_record",
           "generated_text", "gpt_arch", "image_record", "load_checkpoint", "text_record",
           "training_problem", "write_generated_text"]
