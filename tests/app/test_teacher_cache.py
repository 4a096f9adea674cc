"""Teacher cache (train/teacher_cache.py): exact against the live teachers, stale caches refused, resumable."""
import json

import pytest
import torch

from gdrd_fast.train import Trainer
from gdrd_fast.train import teacher_cache as tc
from test_train import build
from train_cases import Faces

VIEWS = dict(resolution=4, flip=True, interpolation="bilinear", antialias=True)


def write_cache(folder, stage, dtype="float32", **kwargs):
    return tc.build_cache(folder, tc.stage_outputs(stage, VIEWS), Faces(), VIEWS, dtype=dtype, chunk=4,
                          progress=False, **kwargs)


def twin(kind):
    """Two trainers of the same fresh stage: the second's teachers must be replaced by the cache."""
    torch.manual_seed(0)
    live = build(kind)
    cached = build(kind)
    cached.stage.load_state_dict(live.stage.state_dict())
    return live, cached


def with_cache(trainer, folder, num_workers=0):
    return Trainer(trainer.stage, Faces(), trainer.runtime, _optim(), batch_size=4, seed=3, resolution=4,
                   progress=False, teacher_cache=tc.TeacherCache(folder), num_workers=num_workers)


def _optim():
    from gdrd_fast.train import OptimConfig
    return OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=6)


@pytest.mark.parametrize("kind", ["stage1", "rcd", "crd"])
def test_training_from_a_float32_cache_equals_the_live_teachers(kind, tmp_path):
    live, cached = twin(kind)
    write_cache(tmp_path, cached.stage)
    cached = with_cache(cached, tmp_path, num_workers=1 if kind == "crd" else 0)  # read in a worker too
    calls = []
    teacher = cached.stage.teacher
    teacher.register_forward_hook(lambda *args: calls.append(1))
    torch.manual_seed(5)
    live.train_steps(4)
    torch.manual_seed(5)
    cached.train_steps(4)
    assert not calls  # the cached run never ran the teacher
    for a, b in zip(live.history, cached.history):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(live.stage.named_parameters(), cached.stage.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)  # float32 rounding: ~1e-6 seen


@pytest.mark.parametrize("dtype, bound", [("bf16", 1e-2), ("fp8", 0.1)])
def test_low_precision_error_is_reported_and_small(dtype, bound, tmp_path):
    if tc.DTYPES[dtype][1] is None:
        pytest.skip("this torch has no float8_e4m3fn")
    trainer = build("rcd")
    manifest = write_cache(tmp_path, trainer.stage, dtype)
    error = manifest["error"]["embedding"]
    assert 0 < error["relative"] < bound and error["max_abs"] > 0
    per_value = {"bf16": 2, "fp8": 1}[dtype]  # 18 images x 2 flips x 16 values
    assert (tmp_path / "embedding.bin").stat().st_size == 18 * 2 * 16 * per_value
    assert (tmp_path / "embedding.scale.bin").is_file() == (dtype == "fp8")


@pytest.mark.parametrize("dtype, bound", [("bf16", 5e-3), ("fp8", 5e-2)])
@pytest.mark.parametrize("kind", ["stage1", "rcd"])
def test_a_low_precision_cache_moves_the_losses_by_its_rounding(kind, dtype, bound, tmp_path):
    """docs/method/training.md quotes these: the first steps' loss terms against the live teachers'."""
    if tc.DTYPES[dtype][1] is None:
        pytest.skip("this torch has no float8_e4m3fn")
    live, cached = twin(kind)
    write_cache(tmp_path, cached.stage, dtype)
    cached = with_cache(cached, tmp_path)
    torch.manual_seed(5)
    live.train_steps(2)
    torch.manual_seed(5)
    cached.train_steps(2)
    for a, b in zip(live.history, cached.history):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=bound, abs=1e-6), key


def test_a_stale_cache_is_refused_naming_what_differs(tmp_path):
    trainer = build("stage1")
    write_cache(tmp_path, trainer.stage)
    other = build("stage1")  # another random teacher: another weights hash
    with pytest.raises(tc.StaleCacheError) as refused:
        Trainer(other.stage, Faces(), other.runtime, _optim(), batch_size=4, resolution=4, progress=False,
                teacher_cache=tc.TeacherCache(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and "data.teacher_cache" in message and "tap.weights_sha256" in message
    other.stage.load_state_dict(trainer.stage.state_dict())
    other.stage.target.input_size = 8  # another input size
    with pytest.raises(tc.StaleCacheError, match=r"tap.input_size: 12 in the cache, 8 here"):
        tc.TeacherCache(tmp_path).dataset_for(other.stage, Faces(), VIEWS)
    other.stage.target.input_size = 12
    other.stage.teacher.tap = "down_blocks.1"  # another tap
    with pytest.raises(tc.StaleCacheError, match=r"tap.tap: None in the cache, 'down_blocks.1' here"):
        tc.TeacherCache(tmp_path).dataset_for(other.stage, Faces(), VIEWS)
    del other.stage.teacher.tap
    with pytest.raises(tc.StaleCacheError, match=r"tap.resolution: 4 in the cache, 8 here"):
        tc.TeacherCache(tmp_path).dataset_for(other.stage, Faces(), VIEWS | {"resolution": 8})
    with pytest.raises(tc.StaleCacheError, match="holds no 'embedding'"):
        tc.TeacherCache(tmp_path).dataset_for(build("rcd").stage, Faces(), VIEWS)


def test_a_killed_cache_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    trainer = build("rcd")
    write_cache(tmp_path / "whole", trainer.stage, "bf16")
    real, calls = tc.compute, []

    def dies_at_chunk_three(*args):
        calls.append(1)
        if len(calls) == 4:  # the shape probe, then chunks 0 and 1
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tc, "compute", dies_at_chunk_three)
    with pytest.raises(KeyboardInterrupt):
        write_cache(tmp_path / "killed", trainer.stage, "bf16")
    monkeypatch.setattr(tc, "compute", real)
    with pytest.raises(tc.StaleCacheError, match="incomplete"):
        tc.TeacherCache(tmp_path / "killed")
    data = tmp_path / "killed" / "embedding.bin"
    raw = bytearray(data.read_bytes())
    raw[-64:] = b"\xff" * 64  # a chunk the kill left half written
    data.write_bytes(bytes(raw))
    assert tc.chunks_done(tmp_path / "killed", 5).tolist() == [True, True, False, False, False]
    write_cache(tmp_path / "killed", trainer.stage, "bf16")
    for name in ("embedding.bin", "manifest.json"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert json.loads((tmp_path / "whole" / "manifest.json").read_text())["complete"]


def test_a_folder_holding_another_cache_is_not_overwritten(tmp_path):
    trainer = build("rcd")
    write_cache(tmp_path, trainer.stage)
    before = (tmp_path / "embedding.bin").read_bytes()
    with pytest.raises(tc.StaleCacheError, match="dtype: 'float32' in the cache, 'bf16' here"):
        write_cache(tmp_path, trainer.stage, "bf16")
    assert (tmp_path / "embedding.bin").read_bytes() == before


def test_noisy_generative_targets_cannot_be_cached():
    trainer = build("stage1")
    trainer.stage.target.noise = 0.1
    with pytest.raises(ValueError, match="generative_teacher_noise"):
        tc.stage_outputs(trainer.stage, VIEWS)


@pytest.mark.diffusers
@pytest.mark.slow
def test_cache_teachers_then_train_reads_it_and_a_stale_one_is_refused(tmp_path, capsys):
    from gdrd_fast import cli, models
    from gdrd_fast.data import write_synthetic_dataset
    from gdrd_fast.train import load_checkpoint, load_config
    from gdrd_fast.train.pipeline import train_gdrd
    data = write_synthetic_dataset(tmp_path / "data", num_train_identities=3, images_per_identity=2,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                   image_size=112)
    weights = {"head": models.ArcFaceHead(512, 3), "td": models.build_discriminative_teacher("r18"),
               "tg": models.build_generative_teacher("diffusers", "tiny")}  # files: random teachers differ per build
    for name, module in weights.items():
        torch.save(module.state_dict(), tmp_path / f"{name}.pt")
    overrides = [f"data.train_root={data['train']}", "data.batch_size=2", "data.num_workers=0", "amp=none",
                 "device=cpu", "models.student=r18", "models.discriminative_teacher=r18",
                 f"models.discriminative_teacher_weights={tmp_path / 'td.pt'}",
                 f"models.discriminative_teacher_head={tmp_path / 'head.pt'}", "models.generative_teacher=diffusers",
                 f"models.generative_teacher_weights={tmp_path / 'tg.pt'}",
                 "models.generative_teacher_config=tiny", "models.generative_teacher_input=32",
                 "stage1.optim.steps=1", "stage2.optim.steps=1", "stage2.rcd.queue_size=4",
                 "stage2.rcd.num_negatives=2", f"data.teacher_cache={tmp_path / 'c'}"]
    assert cli.main(["cache-teachers", "--dtype", "float32", "--no-progress",
                     *[a for o in overrides for a in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    relative = [float(line.rsplit("relative ", 1)[1]) for line in out.splitlines() if "relative" in line]
    assert "tap [" in out and "embedding [512]" in out and len(relative) == 2 and max(relative) < 1e-5
    cached = train_gdrd(load_config("paper", overrides + [f"output_dir={tmp_path / 'cached'}"]))
    assert "reading tap from the teacher cache" in (tmp_path / "cached" / "train.log").read_text()
    live = train_gdrd(load_config("paper", overrides[:-1] + [f"output_dir={tmp_path / 'live'}"]))
    a, b = load_checkpoint(cached), load_checkpoint(live)
    for key in a:  # targets agree to ~1e-6 (the report above); IResNet's BN over a batch of 2 amplifies that
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3, msg=key)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # another input size for T_g: refused before any step
        cli.main(["train", *[a for o in overrides + ["models.generative_teacher_input=24"] for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "data.teacher_cache" in err and "tap.input_size: 32 in the cache, 24 here" in err


@pytest.mark.parametrize("kind", ["stage1", "rcd"])
def test_live_teachers_in_channels_last_and_bf16_keep_shapes_and_values(kind):
    """What the trainer sets on a GPU for uncached teachers, checked on the CPU: NHWC gives the same
    numbers; bf16 autocast the same shapes, within bf16's precision."""
    trainer = build(kind)
    stage = trainer.stage.eval()
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    lr = torch.nn.functional.interpolate(hr, size=4, mode="bilinear", antialias=True)
    lr = torch.nn.functional.interpolate(lr, size=16, mode="bilinear")

    def teacher_output():
        if kind == "stage1":
            return stage.target.features(lr)
        with torch.no_grad():
            return stage.teacher(hr.contiguous(memory_format=stage.teacher_memory_format)).float()

    reference = teacher_output()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = teacher_output()
    stage.teachers_channels_last()
    assert (stage.target.teacher if kind == "stage1" else stage.teacher[0][0]).weight.is_contiguous(
        memory_format=torch.channels_last)
    nhwc = teacher_output()
    assert nhwc.shape == low.shape == reference.shape and low.dtype == torch.float32
    torch.testing.assert_close(nhwc, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low, reference, rtol=3e-2, atol=3e-2 * float(reference.abs().max()))


def _cache_rank(rank, port, folder):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    from gdrd_fast.train import Runtime
    runtime = Runtime.create("cpu")  # joins the group as under torchrun
    torch.manual_seed(0)
    write_cache(folder, build("rcd").stage, "bf16", rank=runtime.rank, world_size=runtime.world_size)
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_the_chunks_and_write_the_bytes_of_one_process(tmp_path):
    import torch.multiprocessing as mp
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.spawn(_cache_rank, args=(store.port, str(tmp_path / "two")), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        write_cache(tmp_path / "one", build("rcd").stage, "bf16")
    finally:
        torch.set_num_threads(threads)
    for name in ("embedding.bin", "manifest.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    flags = [list((tmp_path / "two" / f"done-rank{r}.bin").read_bytes()) for r in (0, 1)]
    assert flags == [[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]  # chunk c by rank c mod 2


def test_a_missing_cache_folder_fails_before_anything_is_loaded(tmp_path, capsys):
    from gdrd_fast import cli
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--set", f"data.teacher_cache={tmp_path / 'nope'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"data.teacher_cache: no file or folder at '{tmp_path / 'nope'}'" in err
