"""The optional training speed-ups: the conditioning cache (same losses, invalidation, corrupt entries, caption-cut
counts) and the compiled UNet (same loss as eager, checkpoints interchangeable)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyref.model import ModelConfig
from tests import test_train
from tests.conftest import SMALL_PIXELS
from tests.train_fixtures import RESOLUTION, write_groups

# test_train's module-scoped fixtures, a separate instance for this module: a work folder and an MLflow database
workdir, tracking_uri = test_train.workdir, test_train.tracking_uri

# longer than the text encoders' 77 tokens, so the runs cut (and count) captions
LONG = ", drawn with a thin pen on grey paper beside a blue circle and a green triangle" * 2
STEPS = 8  # 16 samples over 6: every sample is seen twice or more, so a cold run hits too


@pytest.fixture(scope="module")
def groups_dir(workdir) -> Path:
    root = write_groups(workdir / "groups")
    lines = [json.loads(x) for x in (root / "captions.jsonl").read_text().splitlines()]
    (root / "captions.jsonl").write_text(
        "".join(json.dumps(x | {"caption": x["caption"] + LONG}) + "\n" for x in lines)
    )
    return root


def _config(tiny_models: Path, groups_dir: Path, **kw):
    from easyref.train.config import TrainConfig

    base = dict(
        base=str(tiny_models),
        data=str(groups_dir),
        resolution=RESOLUTION,
        batch_size=2,
        max_steps=STEPS,
        save_every=0,
        preview_every=-1,
        model=ModelConfig(num_tokens=8, **SMALL_PIXELS),
    )
    return TrainConfig(**(base | kw))


def _metrics(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).data.metrics


@pytest.fixture(scope="module")
def runs(workdir, tiny_models, groups_dir, tracking_uri):
    """The same stage-1 run without the cache, with a cold cache, then with the warm cache."""
    from easyref.train.loop import train

    cache = workdir / "cache"
    return {
        name: train(_config(tiny_models, groups_dir, cache_dir=str(cache) if name != "off" else ""), workdir / name)
        for name in ("off", "cold", "warm")
    }


def test_cached_runs_train_the_same_losses(runs, workdir, tracking_uri):
    off, cold, warm = (runs[k].losses for k in ("off", "cold", "warm"))
    assert len(off) == STEPS
    # A batch with any sample missing from the cache is encoded whole, as without the cache, so a cold run's first
    # visits are bit-identical; later steps read per-sample entries encoded in another batch, where CPU kernels may
    # round differently by batch composition (measured: 1.3e-7 cold, 2.8e-7 warm, a float32 ulp or two). 1e-5
    # relative is far below what any caching mistake gives (another noise draw or stale states: ~1e-1).
    assert cold == pytest.approx(off, rel=1e-5, abs=0)
    assert warm == pytest.approx(off, rel=1e-5, abs=0)
    assert off[0] == cold[0]  # the first step is all misses: exactly the uncached computation
    counts = {k: _metrics(tracking_uri, runs[k].run_id) for k in runs}
    # 16 samples, each a latent and a caption lookup; the warm run reads everything
    assert counts["warm"]["cache_hits"] == 2 * 2 * STEPS and counts["warm"]["cache_misses"] == 0
    assert counts["cold"]["cache_misses"] > 0 and counts["cold"]["cache_hits"] > 0
    assert "cache_hits" not in counts["off"]
    # the caption cut is counted on cache hits too
    assert counts["warm"]["captions_truncated"] == counts["off"]["captions_truncated"] > 0
    assert counts["warm"]["captions_encoded"] == counts["off"]["captions_encoded"] == 2 * STEPS
    assert not list((workdir / "cache").rglob("*.tmp"))


def _base(tiny_models: Path):
    from easyref.base_models import BaseModels

    return BaseModels.load(tiny_models / "sdxl")


def test_a_changed_base_misses_and_file_hashes_are_memoised(runs, workdir, tiny_models, tmp_path):
    from easyref.train.cache import ConditioningCache, target_key

    cache_dir = workdir / "cache"
    same = ConditioningCache.open(cache_dir, _base(tiny_models))
    assert same.files_hashed == 0  # every base file's hash came from the memo
    entries = sorted(same.latents.root.rglob("*.safetensors"))
    assert entries and same.latents.get(entries[0].stem) is not None
    changed = shutil.copytree(tiny_models / "sdxl", tmp_path / "sdxl")
    config = changed / "vae" / "config.json"
    config.write_text(config.read_text() + "\n")  # same VAE, other bytes: a different revision of the base
    other = ConditioningCache.open(cache_dir, _base(tmp_path))
    assert other.latents.root != same.latents.root and other.text.root == same.text.root
    assert other.latents.get(entries[0].stem) is None
    target = torch.zeros(3, RESOLUTION, RESOLUTION)
    assert other.latents.lookup([target_key(target)]) is None and other.counts()["cache_misses"] == 1


def test_a_corrupt_entry_is_recomputed_and_counted(runs, workdir, tiny_models):
    from easyref.train.cache import ConditioningCache, caption_key, target_key
    from easyref.train.recipe import Conditioner, step_generator

    base = _base(tiny_models)
    fresh = Conditioner(base, (0.0, 0.0, 0.0))
    cache = ConditioningCache.open(workdir / "cache", base)
    cached = Conditioner(base, (0.0, 0.0, 0.0), cache=cache)
    target = torch.linspace(-1, 1, 2 * 3 * RESOLUTION * RESOLUTION).reshape(2, 3, RESOLUTION, RESOLUTION)
    captions = ["a red star", "a blue square"]
    cached.encode_latents(target, step_generator(0, 0, 0, 0))
    cached.encode_text(captions)
    latent_entry = cache.latents.path(target_key(target[0]))
    data = latent_entry.read_bytes()
    latent_entry.write_bytes(data[: len(data) // 2])  # truncated
    text_entry = cache.text.path(caption_key(captions[1]))
    data = bytearray(text_entry.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    text_entry.write_bytes(bytes(data))
    latents = cached.encode_latents(target, step_generator(0, 0, 0, 0))
    text, pooled = cached.encode_text(captions)
    assert torch.equal(latents, fresh.encode_latents(target, step_generator(0, 0, 0, 0)))
    want_text, want_pooled = fresh.encode_text(captions)
    assert torch.equal(text, want_text) and torch.equal(pooled, want_pooled)
    assert cache.counts()["cache_corrupt"] == 2
    assert cache.latents.get(target_key(target[0])) is not None  # rewritten
    assert cache.text.get(caption_key(captions[1])) is not None
    assert cached.captions.seen == 4  # counted on every call, hit or miss


def test_an_entry_copied_under_another_key_or_base_is_recomputed_not_trained_on(tiny_models, tmp_path):
    """Each entry records its key and fingerprint: another caption's states (or another base's) are never a hit."""
    from easyref.train.cache import ConditioningCache, caption_key, target_key
    from easyref.train.recipe import Conditioner, step_generator

    base = _base(tiny_models)
    fresh = Conditioner(base, (0.0, 0.0, 0.0))
    cache = ConditioningCache.open(tmp_path / "cache", base)
    cached = Conditioner(base, (0.0, 0.0, 0.0), cache=cache)
    captions = ["a red star", "a blue square"]
    target = torch.linspace(-1, 1, 2 * 3 * RESOLUTION * RESOLUTION).reshape(2, 3, RESOLUTION, RESOLUTION)
    cached.encode_text(captions)
    cached.encode_latents(target, step_generator(0, 0, 0, 0))
    shutil.copyfile(cache.text.path(caption_key(captions[0])), cache.text.path(caption_key(captions[1])))
    shutil.copyfile(cache.latents.path(target_key(target[0])), cache.latents.path(target_key(target[1])))
    text, pooled = cached.encode_text(captions)
    want_text, want_pooled = fresh.encode_text(captions)
    assert torch.equal(text, want_text) and torch.equal(pooled, want_pooled)
    latents = cached.encode_latents(target, step_generator(0, 0, 0, 0))
    assert torch.equal(latents, fresh.encode_latents(target, step_generator(0, 0, 0, 0)))
    assert cache.counts()["cache_corrupt"] == 2
    # an entry moved into another base's folder (same key) is not that base's entry either
    other = ConditioningCache(tmp_path / "cache", "0" * 20, cache.text.root.name)
    key = target_key(target[0])
    other.latents.path(key).parent.mkdir(parents=True)
    shutil.copyfile(cache.latents.path(key), other.latents.path(key))
    assert other.latents.get(key) is None and other.counts()["cache_corrupt"] == 1
    assert cache.latents.get(key) is not None and cache.text.get(caption_key(captions[1])) is not None


def test_cache_and_compile_come_from_params_and_flags(tmp_path):
    import yaml

    from easyref.cli import build_parser
    from easyref.errors import UserError
    from easyref.train.config import load_train_config

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"cache_dir": "outputs/cache", "compile_unet": True}}))
    config = load_train_config(params, "pretrain")
    assert config.cache_dir == "outputs/cache" and config.compile_unet
    args = build_parser("train").parse_args(
        ["train", "--stage", "pretrain", "--out", "x", "--cache-dir", "c", "--compile-unet"]
    )
    config = load_train_config(None, "pretrain", vars(args))
    assert config.cache_dir == "c" and config.compile_unet
    args = build_parser("train").parse_args(
        ["train", "--stage", "pretrain", "--out", "x", "--compile-backend", "aot_eager"]
    )
    assert load_train_config(None, "pretrain", vars(args)).compile_backend == "aot_eager"
    with pytest.raises(UserError, match="compile_unet is not supported with fsdp"):
        load_train_config(None, "pretrain", {"compile_unet": True, "fsdp": True})


def test_compiled_unet_keeps_its_state_dict_keys(tiny_models):
    from easyref.model import load_model
    from easyref.train.build import compile_unet

    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    keys = list(model.state_dict())
    compile_unet(model, torch.device("cpu"))
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints load into an eager model
    from easyref.errors import UserError

    with pytest.raises(UserError, match="'inductr' is not a torch.compile backend; choose from .*inductor"):
        compile_unet(model, torch.device("cpu"), backend="inductr")


@pytest.mark.slow
def test_compiled_unet_trains_the_eager_loss_and_its_checkpoint_loads_eager(
    workdir, tiny_models, groups_dir, tracking_uri
):
    from easyref.model import load_model
    from easyref.train.checkpoint import list_checkpoints
    from easyref.train.loop import train

    results = {}
    for compiled in (False, True):
        # aot_eager: dynamo captures the UNet's forward and backward graphs (what breaks when a model does not
        # compile) and runs them with the eager kernels; inductor's own kernels cost ~5 min of C++ compiling on a
        # cold 2-core machine, so their speed and loss are measured by benchmarks/bench_train_cache.py instead
        config = _config(
            tiny_models, groups_dir, max_steps=3, save_every=1, compile_unet=compiled, compile_backend="aot_eager"
        )
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        results[compiled] = train(config, workdir / f"compiled_{compiled}")
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs  # the compiled run really ran captured graphs; the eager one none
    # the captured graphs may order float32 reductions differently: the same computation up to rounding, which three
    # Adam steps at lr 1e-4 do not amplify beyond 1e-4 relative
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-4)
    saved = load_file(list_checkpoints(workdir / "compiled_True")[-1] / "trainable.safetensors")
    assert saved and not any("_orig_mod" in k for k in saved)
    eager = load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=results[True].final)
    reference = load_model(tiny_models / "sdxl", tiny_models / "mllm", checkpoint=results[False].final)
    state, want = eager.state_dict(), reference.state_dict()
    for key in saved:
        assert torch.allclose(state[key], saved[key]) and torch.allclose(state[key], want[key], rtol=1e-3, atol=1e-5)


def test_compile_without_a_cpp_compiler_on_cpu_is_refused(tiny_models, monkeypatch):
    from torch._inductor import config as inductor

    from easyref.errors import UserError
    from easyref.model import load_model
    from easyref.train.build import compile_unet

    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=ModelConfig(num_tokens=8, **SMALL_PIXELS))
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler-for-easyref",))
    with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
        compile_unet(model, torch.device("cpu"))
    assert not hasattr(model.unet, "_compiled_call_impl") or model.unet._compiled_call_impl is None
