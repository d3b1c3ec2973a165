"""ShapesVQ: interface shapes and ranges, strict checkpoints, the quantizer's EMA and dead-code restart, and short
training runs (loss goes down, resume reproduces an uninterrupted run, a finished out_dir is left alone).

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
from modeling.vq.shapes_vq import (
    L2EMAQuantizer, ShapesVQ, ShapesVQConfig, pixels_to_uint8, psnr_uint8, uint8_to_pixels,
)

TINY = dict(image_size=32, channels=(8, 16, 32), enc_res_blocks=1, dec_res_blocks=1, codebook_size=64, code_dim=8)


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
    summary = tv.train_loop(model, shapes_images[:128], cfg, time_budget_s=600)
    after = tv.evaluate(model, shapes_images[128:])
    assert summary["steps"] == 100 and not summary["stopped_by_time_budget"]
    # measured: MSE 0.090 -> 0.060 and held-out PSNR 16.0 -> 18.4 dB after 80 steps
    assert summary["last_mse"] < 0.8 * summary["first_mse"]
    assert after["psnr_db"] > before["psnr_db"] + 1.5
    assert after["codes_used"] > 1 and after["usage_pct"] >= 25.0  # restarts keep the small codebook in use


def test_resume_reproduces_an_uninterrupted_run(tmp_path, shapes_images, monkeypatch):
    cfg = tiny_train_config()

    def run(state_path) -> ShapesVQ:
        torch.manual_seed(0)
        model = ShapesVQ(cfg.model)
        tv.train_loop(model, shapes_images[:128], cfg, time_budget_s=600, state_path=state_path, save_every=4)
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


def test_train_vq_cli_writes_checkpoint_and_skips_a_finished_out_dir(tmp_path):
    kw = dict(num_train=32, num_eval=8, max_steps=3, warmup_steps=1, batch_size=16, precision="fp32", image_size=32,
              channels=(8, 16, 32), codebook_size=64, code_dim=8, enc_res_blocks=1, dec_res_blocks=1, num_threads=1)
    out = tmp_path / "vq"
    metrics = tv.train_vq(out_dir=str(out), **kw)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["psnr_db"] == metrics["psnr_db"]
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


def test_lr_schedule_warmup_cosine_and_time_term():
    cfg = tiny_train_config(max_steps=100, warmup_steps=10, lr=1e-2, min_lr_ratio=0.1)
    assert tv.lr_at(cfg, 0, 0.0) == pytest.approx(1e-3)  # warmup: (step + 1) / warmup_steps
    assert tv.lr_at(cfg, 10, 0.0) == pytest.approx(1e-2)
    assert tv.lr_at(cfg, 50, 0.5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert tv.lr_at(cfg, 99, 1.0) == pytest.approx(1e-3) == tv.lr_at(cfg, 99, 1.7)  # floor at min_lr_ratio
    assert 1 <= tv.pick_num_threads() <= 2
