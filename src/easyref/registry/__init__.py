"""Register an evaluated checkpoint in the MLflow model registry and promote it by alias.

Example:

  easyref register --checkpoint checkpoints/multi --metrics outputs/eval/metrics.json --model-name easyref \\
      --base models/tiny --params params.yaml --promote

What it does, in order:

1. Checks the evidence: the checkpoint's SHA-256 (over its files) must equal the one ``easyref evaluate`` recorded in
   ``evaluation.json`` beside ``metrics.json``; metrics must be finite; with ``--promote`` every gate metric must be
   there. Anything else is refused before the registry is touched.
2. If a complete version of the model already carries that hash (tag ``checkpoint_sha256``), nothing new is logged.
3. Otherwise logs an MLflow pyfunc model (the library's sampler) that travels: the ``easyref`` code, the checkpoint
   and (by default) the base models are bundled with it; with ``register.base_models`` the base models are recorded
   as hub ids with revisions or URIs instead. The model is loaded and run on its input example as the serving
   endpoint would, then registered with tags (metrics, git commit, hashes) and ``easyref.status=ready`` last.
4. Points the alias ``challenger`` at the version.
5. With ``--promote``, evaluates ``register.gate``: absolute bounds (``min`` / ``max``, also without a champion) and
   comparisons with ``@champion`` (``margin``); moves ``champion`` only if every rule passes. The decision and the
   numbers are recorded as tags of the challenger version either way.

Reliability: aliases move only after a version is complete; a failure half-way deletes the half-made version, never
touches an alias, and the error says what to re-run. Registrations of one model are serialised by a lock file in
``register.lock_dir`` (per host by default, across hosts on a shared volume), and ``champion`` is moved with a
compare-and-set check and read back.
"""

from easyref.registry.command import add_arguments, run
from easyref.registry.config import GateRule, RegisterConfig, check_model_name
from easyref.registry.evidence import checkpoint_sha256, git_commit, read_metrics, resolve_tracking_uri
from easyref.registry.gate import CHALLENGER, CHAMPION, GateLine, Registration, evaluate_gate, promote
from easyref.registry.pyfunc import EasyRefModel, decode_png, encode_png, input_example, model_signature
from easyref.registry.store import register

HELP = "register an evaluated checkpoint in the MLflow registry (@challenger) and promote it (@champion)"

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EasyRefModel",
    "GateLine",
    "GateRule",
    "RegisterConfig",
    "Registration",
    "add_arguments",
    "check_model_name",
    "checkpoint_sha256",
    "decode_png",
    "encode_png",
    "evaluate_gate",
    "git_commit",
    "input_example",
    "model_signature",
    "promote",
    "read_metrics",
    "register",
    "resolve_tracking_uri",
    "run",
]
