"""ShapesVQ: interface shapes and ranges, strict checkpoints, the quantizer's EMA and dead-code restart, the
edge-weighted loss, short training runs (loss goes down, resume reproduces an uninterrupted run, a finished out_dir
is left alone), the speed selection (with a fake clock) and the quality gate's measurement and verdict.

Everything runs on a tiny flavour (32x32 images, an 8x8 grid, 64 codes) so the file stays within a few seconds of
compute on 2 cores.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data_process import train_vq as tv
from modeling.vq import load_image_tokenizer
from modeling.vq.base import file_hash
from modeling.vq.base import EncodedImages
from modeling.vq.shapes_vq import (
    L2EMAQuantizer, ShapesVQ, ShapesVQConfig, edge_weights, pixels_to_uint8, psnr_uint8, uint8_to_pixels,
)

TINY = dict(image_size=32, channels=(8, 16, 32), enc_res_blocks=0, dec_res_blocks=1, codebook_size=64, code_dim=8)


def tiny_model() -> ShapesVQ:
    return ShapesVQ(ShapesVQConfig(**TINY)).eval()


def tiny_train_config(**overrides) -> tv.TrainVQConfig:
    kw = dict(num_train=128, num_eval=32, batch_size=16, max_steps=10, warmup_steps=2, lr=3e-3, precision="fp32",
              model=ShapesVQConfig(**TINY))
    kw.update(overrides)
    return tv.TrainVQConfig(**kw)


@pytest.fixture(scope="module")
def shapes_images() -> torch.Tensor:
    """160 rendered 32x32 scenes of the real shapes world (uint8, N x 3 x 32 x 32)."""
    from data_process.shapes_world import ShapesWorld

    return tv.render_images(ShapesWorld(seed=0, image_size=32), range(160), "test")


def pil_images(n: int, size: tuple[int, int]) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------- interface
def test_encode_decode_shapes_and_ranges():
    model = tiny_model()
    pixels = model.preprocess(pil_images(3, (40, 56)))
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    enc = model.encode(pixels)
    assert enc.grid == (8, 8) == model.grid
    assert enc.codes_BN.shape == (3, 64) and enc.codes_BN.dtype == torch.long
    assert 0 <= int(enc.codes_BN.min()) and int(enc.codes_BN.max()) < model.level_sizes[0] == 64
    assert torch.equal(enc.levels_N, torch.zeros(64, dtype=torch.long))
    recon = model.decode(enc.codes_BN, enc.grid)
    assert recon.shape == (3, 3, 32, 32) and recon.min() >= -1.0 and recon.max() <= 1.0
    with pytest.raises(ValueError, match=r"codes must be in \[0, 64\)"):
        model.decode(torch.full((1, 64), 64), (8, 8))
    with pytest.raises(ValueError, match="fixed grid"):
        model.preprocess(pil_images(1, (32, 32)), grid=(4, 4))
    with pytest.raises(ValueError, match="own grid"):
        model.decode(enc.codes_BN, (4, 16))


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # A 128x64 image: red | blue (centre half) | green. Shorter side -> 32, then the centre 32x32 is all blue.
    image = Image.new("RGB", (128, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    image.paste((0, 255, 0), (96, 0, 128, 64))
    got = pixels_to_uint8(tiny_model().preprocess([image]))[0]
    blue = torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32)
    diff = (got.int() - blue.int()).abs()
    assert diff[:, :, 1:-1].max() <= 2  # blue everywhere but the outermost columns
    assert diff[:, :, [0, -1]].max() < 40  # which bicubic blends with the cropped-away red/green only slightly


def test_uint8_pixel_round_trip_and_psnr():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(pixels_to_uint8(uint8_to_pixels(images)), images)
    noisy = images.clone()
    noisy[0, 0, 0, 0] ^= 1  # one pixel off by one grey level: mse = 1 / 192
    psnr = psnr_uint8(noisy, images)
    assert torch.isinf(psnr[1])
    assert psnr[0].item() == pytest.approx(10 * torch.log10(torch.tensor(255.0**2 * 192)).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_gives_identical_codes(tmp_path):
    model = tiny_model()
    pixels = model.preprocess(pil_images(4, (32, 32)))
    model.save_pretrained(tmp_path / "vq")
    loaded = load_image_tokenizer("shapes", str(tmp_path / "vq"))
    assert isinstance(loaded, ShapesVQ) and loaded.config == model.config
    assert loaded.checkpoint_hash == model.checkpoint_hash == file_hash(tmp_path / "vq" / "model.safetensors")
    assert loaded.tokenizer_id == f"shapes-vq@{model.checkpoint_hash}"
    codes = model.encode(pixels).codes_BN
    assert torch.equal(loaded.encode(pixels).codes_BN, codes)
    assert torch.equal(loaded.decode(codes, (8, 8)), model.decode(codes, (8, 8)))


def test_strict_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ShapesVQ.from_checkpoint(tmp_path / "nowhere")
    tiny_model().save_pretrained(tmp_path / "vq")
    config_path = tmp_path / "vq" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "channels": [8, 16, 48]}))  # the 16x16 width no longer matches
    with pytest.raises(ValueError, match=r"model\.safetensors.*shape mismatches.*encoder\.down\.1\.weight"):
        ShapesVQ.from_checkpoint(tmp_path / "vq")
    config_path.write_text(json.dumps({**config, "dec_res_blocks": 2}))  # an extra block: missing keys
    with pytest.raises(ValueError, match=r"missing keys \['decoder\.res\.1\.conv1\.bias'"):
        ShapesVQ.from_checkpoint(tmp_path / "vq")
    config_path.write_text(json.dumps({**config, "widths": [1]}))
    with pytest.raises(ValueError, match=r"config\.json: unknown ShapesVQConfig fields \['widths'\]"):
        ShapesVQ.from_checkpoint(tmp_path / "vq")


# ---------------------------------------------------------------------------------------------- quantizer
def test_ema_moves_codes_to_the_mean_of_their_vectors():
    q = L2EMAQuantizer(codebook_size=4, code_dim=3, decay=0.5, restart_ratio=0.0)
    q.embed_KD.copy_(torch.eye(4, 3).add(0.01))
    q.embed_KD.copy_(torch.nn.functional.normalize(q.embed_KD, dim=1))
    q.embed_sum_KD.copy_(q.embed_KD)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0], [1.0, -0.1, 0.1]]), dim=1)
    codes = q.nearest(z)
    assert codes.tolist() == [0, 0]
    before = q.embed_KD.clone()
    assert q.ema_update(z, codes) == 0
    # code 0: direction of 0.5 * old + 0.5 * (sum of its two vectors); untouched codes stay unit and unmoved
    want = torch.nn.functional.normalize(0.5 * before[0] + 0.5 * z.sum(0), dim=0)
    torch.testing.assert_close(q.embed_KD[0], want)
    torch.testing.assert_close(q.embed_KD[1:], before[1:])
    torch.testing.assert_close(q.cluster_size_K, torch.tensor([1.5, 0.5, 0.5, 0.5]))


def test_dead_code_restart_moves_unused_codes_onto_badly_quantised_vectors():
    torch.manual_seed(0)
    q = L2EMAQuantizer(codebook_size=8, code_dim=4, decay=0.9, restart_ratio=0.5)
    # 64 vectors exactly on code 0 (zero error) and 64 noisy vectors far from every code.
    on_code = q.embed_KD[0].expand(64, 4)
    far = torch.nn.functional.normalize(torch.randn(64, 4), dim=1)
    z = torch.cat([on_code, far])
    q.cluster_size_K.copy_(torch.tensor([100.0, 100, 100, 100, 100, 0, 0, 0]))  # codes 5..7 dead
    before = q.embed_KD.clone()
    restarted = q.restart_dead_codes(z, err_N=1.0 - (z @ q.embed_KD.t()).max(1).values)
    assert restarted == 3
    torch.testing.assert_close(q.embed_KD[:5], before[:5])  # live codes untouched
    for k in (5, 6, 7):
        match = (z - q.embed_KD[k]).abs().sum(1) < 1e-6
        assert match.any(), f"code {k} was not moved onto a batch vector"
        assert not match[:64].any(), f"code {k} landed on a zero-error vector"
    assert (q.cluster_size_K[5:] == 128 / 8).all()  # restarted codes get the average mass
    assert q.restart_dead_codes(z) == 0  # ... so they are not restarted again at once


def test_training_mode_restarts_dead_codes_inside_forward():
    q = L2EMAQuantizer(codebook_size=16, code_dim=4, decay=0.5, restart_ratio=0.5).train()
    z_BDhw = torch.randn(2, 4, 4, 4)
    q.cluster_size_K.zero_()  # everything dead: one forward must restart every code
    before = q.embed_KD.clone()
    q(z_BDhw)
    assert not torch.isclose(q.embed_KD, before).all(dim=1).any()


# ---------------------------------------------------------------------------------------------- training
def test_short_training_reduces_loss_and_uses_many_codes(shapes_images):
    torch.manual_seed(0)
    model = ShapesVQ(ShapesVQConfig(**TINY))
    cfg = tiny_train_config(num_train=128, max_steps=100, warmup_steps=5)
    before = tv.evaluate(model, shapes_images[128:])
    summary = tv.train_loop(model, shapes_images[:128], cfg)
    after = tv.evaluate(model, shapes_images[128:])
    assert summary["steps"] == 100 and not summary["stopped_by_time_limit"]
    # measured: MSE 0.090 -> 0.060 and held-out PSNR 16.0 -> 18.4 dB after 80 steps
    assert summary["last_mse"] < 0.8 * summary["first_mse"]
    # one point per CURVE_EVERY steps, each the mean of that stretch: it falls like the loss does
    curve = summary["mse_curve"]
    assert list(curve) == [str(s) for s in range(tv.CURVE_EVERY, 101, tv.CURVE_EVERY)]
    assert curve[str(tv.CURVE_EVERY)] < summary["first_mse"]
    assert after["psnr_db"] > before["psnr_db"] + 1.5
    assert after["codes_used"] > 1 and after["usage_pct"] >= 25.0  # restarts keep the small codebook in use


def test_resume_reproduces_an_uninterrupted_run(tmp_path, shapes_images, monkeypatch):
    cfg = tiny_train_config()
    monkeypatch.setattr(tv, "CURVE_EVERY", 2)
    summaries = []

    def run(state_path) -> ShapesVQ:
        torch.manual_seed(0)
        model = ShapesVQ(cfg.model)
        summaries.append(tv.train_loop(model, shapes_images[:128], cfg, state_path=state_path, save_every=4))
        return model

    reference = run(None)
    original = tv.batch_indices

    def crash_at_step_6(c, step):
        if step == 6:
            raise KeyboardInterrupt("simulated interruption")
        return original(c, step)

    monkeypatch.setattr(tv, "batch_indices", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(tv, "batch_indices", original)
    resumed = run(tmp_path / "state.pt")
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # the loss curve survives the interruption: the points before step 4 come from the saved state
    assert summaries[-1]["mse_curve"] == summaries[0]["mse_curve"] and len(summaries[0]["mse_curve"]) == 5


def test_train_vq_cli_writes_checkpoint_and_skips_a_finished_out_dir(tmp_path):
    kw = dict(num_train=32, num_eval=8, max_steps=3, warmup_steps=1, batch_size=16, precision="fp32", image_size=32,
              channels=(8, 16, 32), codebook_size=64, code_dim=8, enc_res_blocks=1, dec_res_blocks=1, num_threads=1)
    out = tmp_path / "vq"
    metrics = tv.train_vq(out_dir=str(out), **kw)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["psnr_db"] == metrics["psnr_db"]
    # the gate's figures and verdict: 3 steps cannot pass, and 8 scenes are under the 1,000 the gate needs
    assert 0.0 <= saved["detector_exact_pct"] < tv.GATE_MIN_DETECTOR_PCT and saved["num_eval_images"] == 8
    assert saved["gate"]["passed"] is False and saved["gate"]["min_detector_pct"] == tv.GATE_MIN_DETECTOR_PCT
    assert any("8 held-out scenes" in r for r in saved["gate"]["reasons"])
    assert (saved["precision"], saved["num_threads"], saved["speed_timings_s_per_step"]) == ("fp32", 1, {})
    assert 0 < saved["usage_pct"] <= 100 and saved["codes_used"] >= 1
    assert not (out / tv.STATE_NAME).exists()
    model = ShapesVQ.from_checkpoint(out)
    assert saved["tokenizer"] == model.tokenizer_id
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert tv.train_vq(out_dir=str(out), **kw) == saved  # same settings: nothing to do
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="other settings"):
        tv.train_vq(out_dir=str(out), **{**kw, "lr": 1e-3})


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="image_size must be divisible"):
        ShapesVQConfig(image_size=30, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="num_train must be >= batch_size"):
        tv.TrainVQConfig(num_train=8, batch_size=16)
    with pytest.raises(ValueError, match="warmup_steps < max_steps"):
        tv.TrainVQConfig(max_steps=10, warmup_steps=10)


def test_lr_schedule_is_warmup_then_cosine_in_steps_only():
    cfg = tiny_train_config(max_steps=110, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    assert tv.lr_at(cfg, 0) == pytest.approx(1e-3)  # warmup: (step + 1) / warmup_steps
    assert tv.lr_at(cfg, 10) == pytest.approx(1e-2)
    assert tv.lr_at(cfg, 60) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert tv.lr_at(cfg, 110) == pytest.approx(1e-3) == tv.lr_at(cfg, 500)  # floor at min_lr_ratio


def test_time_limit_is_a_guard_that_says_the_schedule_did_not_finish(shapes_images):
    torch.manual_seed(0)
    summary = tv.train_loop(ShapesVQ(ShapesVQConfig(**TINY)), shapes_images[:128], tiny_train_config(), time_limit_s=0)
    assert summary["steps"] == 0 and summary["stopped_by_time_limit"]


# ---------------------------------------------------------------------------------------------- edge-weighted loss
def test_edge_weights_cover_both_sides_of_an_edge_and_leave_flat_areas_at_one():
    pixels = torch.full((1, 3, 8, 8), -0.2)
    pixels[:, :, 2:5, 2:5] = 0.9  # a 3x3 square: a colour step of 1.1 (clamped to 1) on its outline
    w = edge_weights(pixels, 4.0)[0, 0]
    assert w.shape == (8, 8)
    assert torch.all(w[1:6, 1:6] == 5.0)  # the square and one pixel around it (the 3x3 spread of the outline)
    assert torch.all(w[7, :] == 1.0) and torch.all(w[:, 7] == 1.0) and w[0, 0] == 1.0


def test_edge_weighted_loss_weighs_errors_on_edges_more():
    torch.manual_seed(0)
    plain = ShapesVQ(ShapesVQConfig(**{**TINY, "edge_loss_weight": 0.0}))
    weighted = ShapesVQ(ShapesVQConfig(**{**TINY, "edge_loss_weight": 4.0}))
    weighted.load_state_dict(plain.state_dict())
    flat = torch.zeros(2, 3, 32, 32)
    edgy = flat.clone()
    edgy[:, :, 8:20, 8:20] = 0.8
    with torch.no_grad():
        # on a flat image the weights are all one: the weighted loss is the plain one
        assert weighted(flat).loss.item() == pytest.approx(plain(flat).loss.item(), rel=1e-5)
        out_plain, out_weighted = plain(edgy), weighted(edgy)
    assert out_weighted.recon_loss.item() == pytest.approx(out_plain.recon_loss.item(), rel=1e-5)  # logged as MSE
    assert out_weighted.loss.item() != pytest.approx(out_plain.loss.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------------- speed settings
class FakeMachine:
    """A machine simulated by its cost per training step for each (precision, threads): ``step`` stands in for
    ``train_step`` and advances ``clock`` by the cost under the thread count torch is really set to."""

    def __init__(self, cost: dict[tuple[str, int], float]) -> None:
        self.cost, self.now, self.steps = cost, 0.0, 0

    def clock(self) -> float:
        return self.now

    def step(self, model, opt, pixels, setting, grad_clip):
        self.now += self.cost[(setting.precision, torch.get_num_threads())]
        self.steps += 1


@pytest.mark.parametrize("cost, want", [
    # the machine: avx512f without native bf16, where bf16 autocast is 3.7x slower than fp32
    ({("fp32", 1): 0.65, ("fp32", 2): 0.40, ("bf16", 1): 2.43, ("bf16", 2): 1.50}, ("fp32", 2)),
    # a machine with AMX: bf16 is the faster
    ({("fp32", 1): 0.65, ("fp32", 2): 0.40, ("bf16", 1): 0.38, ("bf16", 2): 0.24}, ("bf16", 2)),
    # a busy 2-core box where two threads spin-wait for each other: one thread wins
    ({("fp32", 1): 0.65, ("fp32", 2): 1.90, ("bf16", 1): 2.43, ("bf16", 2): 5.00}, ("fp32", 1)),
])
def test_speed_setting_is_the_fastest_measured(monkeypatch, cost, want):
    machine = FakeMachine(cost)
    monkeypatch.setattr(tv, "train_step", machine.step)
    monkeypatch.setattr(tv.os, "cpu_count", lambda: 2)
    cfg = tiny_train_config(precision="auto")
    images = torch.zeros(cfg.num_train, 3, 32, 32, dtype=torch.uint8)
    threads_before = torch.get_num_threads()
    setting, timings = tv.pick_speed_setting(tiny_model(), images, cfg, num_threads=None, timer=machine.clock)
    assert (setting.precision, setting.num_threads) == want
    assert timings == {str(tv.SpeedSetting(p, n)): pytest.approx(c) for (p, n), c in cost.items()}
    assert machine.steps == 4 * (1 + 3)  # one warm-up and three timed steps per candidate
    assert torch.get_num_threads() == threads_before


def test_speed_candidates_and_a_fixed_setting_is_not_timed(monkeypatch):
    monkeypatch.setattr(tv.os, "cpu_count", lambda: 1)
    assert [str(s) for s in tv.speed_candidates("auto", None)] == ["fp32 x1 thread", "bf16 x1 thread"]
    monkeypatch.setattr(tv.os, "cpu_count", lambda: 16)
    assert len(tv.speed_candidates("auto", None)) == 4 and len(tv.speed_candidates("fp32", None)) == 2
    machine = FakeMachine({})
    monkeypatch.setattr(tv, "train_step", machine.step)
    setting, timings = tv.pick_speed_setting(tiny_model(), torch.zeros(128, 3, 32, 32, dtype=torch.uint8),
                                             tiny_train_config(precision="bf16"), num_threads=2, timer=machine.clock)
    assert (setting, timings, machine.steps) == (tv.SpeedSetting("bf16", 2), {}, 0)


def test_timing_leaves_the_model_and_the_random_stream_untouched(shapes_images):
    torch.manual_seed(0)
    model = ShapesVQ(ShapesVQConfig(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = tiny_train_config()
    timings = tv.time_speed_settings(model, uint8_to_pixels(shapes_images[:16]), cfg,
                                     [tv.SpeedSetting("fp32", 1), tv.SpeedSetting("bf16", 1)], steps=1)
    assert all(t > 0 for t in timings.values()) and len(timings) == 2
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------------- quality gate
class ReplayVQ:
    """A stand-in tokenizer whose "reconstruction" is its input, optionally blanked for some images."""

    def __init__(self, blank: set[int]) -> None:
        self.config, self.blank = ShapesVQConfig(**TINY), blank

    def eval(self):
        return self

    def encode(self, pixels):
        self.pixels = pixels
        return EncodedImages(torch.zeros(pixels.shape[0], 64, dtype=torch.long), torch.zeros(64, dtype=torch.long),
                             (8, 8))

    def decode(self, codes, grid):
        out = self.pixels.clone()
        for i in self.blank:
            out[i] = uint8_to_pixels(torch.tensor([150, 150, 150], dtype=torch.uint8).view(3, 1, 1)).expand(3, 32, 32)
        return out


def test_evaluate_measures_the_detector_on_reconstructions(shapes_images):
    from data_process.shapes_world import ShapesWorld

    world = ShapesWorld(seed=0, image_size=32)
    scenes = [world.scene(i) for i in range(40)]
    perfect = tv.evaluate(ReplayVQ(blank=set()), shapes_images[:40], scenes)
    assert perfect["detector_exact_pct"] == 100.0 and perfect["detector_failures"] == []
    blanked = tv.evaluate(ReplayVQ(blank={3, 7}), shapes_images[:40], scenes)  # two images lose every object
    assert blanked["detector_exact_pct"] == 95.0
    assert blanked["detector_failure_causes"] == {"object lost": 2}
    assert [f["index"] for f in blanked["detector_failures"]] == [3, 7]
    assert blanked["detector_failures"][0]["detected"] == []
    with pytest.raises(ValueError, match="39 scenes for 40 images"):
        tv.evaluate(ReplayVQ(blank=set()), shapes_images[:40], scenes[:39])


def _write_metrics(out, **metrics):
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics))


def test_check_gate_passes_fails_and_refuses_folders_without_gate_figures(tmp_path):
    good = dict(detector_exact_pct=98.5, psnr_db=36.0, num_eval_images=1000, background_consistency_pct=99.0)
    _write_metrics(tmp_path / "good", **good)
    assert tv.check_gate(str(tmp_path / "good")) == good
    low = {**good, "detector_exact_pct": 89.0, "detector_failure_causes": {"wrong shape": 9}}
    _write_metrics(tmp_path / "low", **low)
    with pytest.raises(tv.GateFailed) as e:
        tv.check_gate(str(tmp_path / "low"))
    message = str(e.value)
    for part in (f"detector exact match on reconstructions 89.0% < {tv.GATE_MIN_DETECTOR_PCT:.1f}%", "PSNR >= 30.0 dB", "wrong shape",
                 f"delete {tmp_path / 'low'}", "--max_steps"):
        assert part in message, part
    assert "PSNR 36.0" not in message  # only the failing figure is listed as a reason
    with pytest.raises(tv.GateFailed, match=r"PSNR 29\.9 dB < 30\.0 dB"):
        _write_metrics(tmp_path / "blurry", **{**good, "psnr_db": 29.9})
        tv.check_gate(str(tmp_path / "blurry"))
    with pytest.raises(tv.GateFailed, match="300 held-out scenes, the gate needs >= 1000"):
        _write_metrics(tmp_path / "few", **{**good, "num_eval_images": 300})
        tv.check_gate(str(tmp_path / "few"))
    assert tv.check_gate(str(tmp_path / "few"), min_scenes=300)["num_eval_images"] == 300  # the explicit knob
    with pytest.raises(tv.GateFailed, match=r"background consistency 15\.7% < 90\.0%.*not drawable"):
        _write_metrics(tmp_path / "nonlocal", **{**good, "background_consistency_pct": 15.7})
        tv.check_gate(str(tmp_path / "nonlocal"))
    _write_metrics(tmp_path / "old", psnr_db=35.5, usage_pct=100.0)  # metrics.json of the train_vq before the gate
    with pytest.raises(tv.GateFailed, match="no gate figures"):
        tv.check_gate(str(tmp_path / "old"))
    with pytest.raises(tv.GateFailed, match="missing"):
        tv.check_gate(str(tmp_path / "nowhere"))
    with pytest.raises(tv.GateFailed, match=r"lower VQ_GATE_DETECTOR_PCT"):
        tv.check_gate(str(tmp_path / "low"), min_detector_pct=99.0)


# ---------------------------------------------------------------------------------------------- locality
@pytest.mark.parametrize("norm, local", [("channel", True), ("group", False)])
def test_codes_depend_only_on_their_receptive_field_with_the_channel_norm(norm, local):
    """An object in the top-left corner must not move the encoder output of the far bottom-right position: with
    GroupNorm (statistics over the whole grid) it does, which made the background's codes unlearnable."""
    torch.manual_seed(0)
    model = ShapesVQ(ShapesVQConfig(**{**TINY, "enc_res_blocks": 1}, norm=norm)).eval()  # a block holds the norms
    with torch.no_grad():  # the residual blocks' last convs start at zero: give them weights so the norms matter
        for block in list(model.encoder.res):
            block.conv2.weight.normal_(0, 0.1)
    empty = torch.full((1, 3, 32, 32), -0.2)
    busy = empty.clone()
    busy[:, 0, 2:8, 2:8] = 0.9  # a red-ish square, far outside the receptive field of grid cell (7, 7)
    with torch.no_grad():
        z_empty, z_busy = model.encoder(empty), model.encoder(busy)
    far = (z_empty[..., 7, 7] - z_busy[..., 7, 7]).abs().max().item()
    near = (z_empty[..., 1, 1] - z_busy[..., 1, 1]).abs().max().item()
    assert near > 1e-3  # the object is seen where it is
    assert (far < 1e-6) == local, far


def test_configs_saved_before_the_norm_field_load_as_groupnorm():
    saved = ShapesVQConfig(**TINY).to_dict()
    assert saved["norm"] == "channel" and ShapesVQConfig.from_dict(saved).norm == "channel"
    legacy = {k: v for k, v in saved.items() if k != "norm"}
    assert ShapesVQConfig.from_dict(legacy).norm == "group"
    with pytest.raises(ValueError, match="norm must be one of"):
        ShapesVQConfig(**TINY, norm="batch")


def test_background_consistency_counts_each_position_s_most_common_empty_code():
    gray = torch.full((2, 3, 8, 8), 150, dtype=torch.uint8)
    gray[0, :, 0, 0] = torch.tensor([255, 0, 0], dtype=torch.uint8)  # one object pixel in image 0, patch 0
    empty = tv.empty_positions(gray, (2, 2), margin_px=0)
    assert empty.tolist() == [[False, True, True, True], [True, True, True, True]]
    grown = tv.empty_positions(gray, (2, 2), margin_px=4)  # the grown windows of all four patches reach (0, 0)
    assert grown.tolist() == [[False] * 4, [True] * 4]
    codes = torch.tensor([[5, 1, 1, 2], [9, 1, 3, 2]])
    pct, n = tv.background_consistency(codes, empty)
    assert n == 7 and pct == pytest.approx(100.0 * 6 / 7)  # modal counts per position: 1 + 2 + 1 + 2
    assert tv.background_consistency(codes, torch.zeros_like(empty)) == (100.0, 0)
