"""Evaluate an EasyRef checkpoint: CLIP-I, CLIP-T, DINO-I, reference gain, and baselines in the same table.

Example (tiny profile):

  easyref evaluate --checkpoint checkpoints/multi --split data/split --out outputs/eval \\
      --baseline text --baseline ip_adapter --params params.yaml

One run evaluates several sets, each a section of every output (see :mod:`easyref.evaluate.sections`): with
``--split`` the folder ``easyref split`` wrote, its ``held_in.parquet`` (targets of training groups) and
``held_out.parquet`` (unseen groups), or one of these files alone; with ``--dreambench DIR`` (or
``evaluate.dreambench.folder``) a DreamBench folder too. In a split file each ``role == "target"`` row is one sample;
its references are the ``reference`` rows of the same group; image ``path`` values are relative to the ingest folder,
found through the ``split.json`` beside the split file or given with ``--images-root``. In a DreamBench folder
(``DIR/<subject>/*.jpg`` + ``DIR/prompts_and_classes.txt``) every subject x prompt is a sample whose references and
targets are the subject's images.

Each sample is generated once per method with its own seed (derived from ``evaluate.seed`` and the sample id, so
it does not depend on batching or on which other samples are evaluated); with ``evaluate.images_per_sample`` N
(``--images-per-sample``) N times, each draw with its own seed, and the sample's metrics are the mean over its draws
(every mean and interval is over samples). Methods:

  easyref     the checkpoint, references encoded by the MLLM
  text        text-only SDXL: the same sampler with the reference attention at scale 0 (and any LoRA disabled)
  easyref_swapped  the checkpoint with another group's references (same caption and seed)
  ip_adapter  IP-Adapter-SDXL via diffusers' ``load_ip_adapter``, conditioned on the mean CLIP image embedding of
              the group (the paper's multi-reference baseline)
  lora        per-group LoRA (the paper's tuning-based baseline): a rank-32 LoRA fine-tuned on each group's
              references and captions, then text-only generation

Reference gain (no generation): the denoising loss of each sample's target with its own references vs with the
references of a sample of another group, at the same timesteps and noise. Positive = the model uses the group.

Paired comparisons: per section, EasyRef minus each other method (and IP-Adapter minus text-only) on the same
samples and seeds, with a bootstrap interval over groups; the report says whether the paper's held-out ordering
EasyRef > IP-Adapter > text-only holds on CLIP-I and DINO-I.

Writes to OUT: metrics.json (the full flat table: ``<section>/<method>.<metric>``, ``<section>/paired/easyref_vs_
text.clip_i``, ..., and the primary section's, the held-out one, unprefixed), headline.json (its compact form, for
``dvc metrics show``), evaluation.json (provenance, and the digests of metrics.json and samples.parquet that
``easyref register`` checks), samples.parquet / samples.csv (one row per section, method, sample and draw), images/<section>/<method>/<sample>.png
(later draws ``<sample>-draw<N>.png``), grids/<section>/<sample>.png (references | target |
generated) and report.html (one self-contained page, one part per section), and logs all of it to MLflow.
"""

from easyref.evaluate.command import add_arguments, run

HELP = "evaluate a checkpoint: CLIP-I / CLIP-T / DINO-I, reference gain, baselines, report"

__all__ = ["HELP", "add_arguments", "run"]
