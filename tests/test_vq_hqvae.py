"""HQ-VAE (serialisation, encode/decode, save/load) and the reconstruction evaluation that runs on it
(metrics against hand computations, the eval_recon CLI on a tiny random HQ-VAE and a folder of 8 images)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn

from data_process.eval_recon import TABLE_HEADER, collect_images, evaluate_reconstruction, main, run
from modeling.vq import EncodedImages, ImageTokenizer, load_image_tokenizer
from modeling.vq.hqvae import HQVAE, HQVAEConfig, deserialize, serialize, serialized_levels
from modeling.vq.metrics import (
    CodeStats,
    FeatureMoments,
    frechet_distance,
    gaussian_window,
    perplexity_from_counts,
    psnr,
    ssim,
    usage_from_counts,
)
from modeling.vq.preprocess import Preprocessor

TINY = HQVAEConfig(resolution=16, base_channels=32, channel_multiplier=(1,), num_res_blocks=1, embed_dim=8,
                   level_sizes=(16, 32))


@pytest.fixture(scope="module")
def tiny() -> HQVAE:
    torch.manual_seed(0)
    return HQVAE(TINY).eval()


# -- serialisation ---------------------------------------------------------------------------------------------
def test_serialize_tiny_example_by_hand():
    top = torch.tensor([[[1, 2], [3, 4]]])  # 2x2 top grid
    bottom = torch.tensor([[[10, 11, 20, 21],
                            [12, 13, 22, 23],
                            [30, 31, 40, 41],
                            [32, 33, 42, 43]]])  # 4x4 bottom grid; block of top (i, j) = rows 2i..2i+1, cols 2j..2j+1
    codes, levels = serialize(top, bottom)
    assert codes.tolist() == [[1, 10, 11, 12, 13, 2, 20, 21, 22, 23, 3, 30, 31, 32, 33, 4, 40, 41, 42, 43]]
    assert levels.tolist() == [0, 1, 1, 1, 1] * 4


def test_serialize_round_trip_and_default_length():
    top, bottom = torch.randint(0, 512, (3, 8, 8)), torch.randint(0, 512, (3, 16, 16))
    codes, levels = serialize(top, bottom)
    assert codes.shape == (3, 320) and torch.equal(levels, serialized_levels(64))
    assert levels.tolist() == [0, 1, 1, 1, 1] * 64
    t2, b2 = deserialize(codes, (8, 8))
    assert torch.equal(t2, top) and torch.equal(b2, bottom)
    rect_top, rect_bottom = torch.randint(0, 9, (2, 3, 5)), torch.randint(0, 9, (2, 6, 10))
    t3, b3 = deserialize(serialize(rect_top, rect_bottom)[0], (3, 5))
    assert torch.equal(t3, rect_top) and torch.equal(b3, rect_bottom)
    with pytest.raises(ValueError, match="bottom grid must be"):
        serialize(top, bottom[:, :8])
    with pytest.raises(ValueError, match="codes_BN must be"):
        deserialize(codes[:, :-1], (8, 8))


# -- model -----------------------------------------------------------------------------------------------------
def test_default_config_grids():
    cfg = HQVAEConfig()
    assert (cfg.resolution, cfg.top_grid, cfg.bottom_downsample, cfg.top_downsample) == (128, (8, 8), 8, 16)
    with torch.device("meta"):  # shapes of the default net without compute
        model = HQVAE()
        h_b = model.enc_bottom(torch.empty(1, 3, 128, 128))
        h_t = model.enc_top(h_b)
    assert h_b.shape[-2:] == (16, 16) and h_t.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="multiple of 32"):
        HQVAEConfig(base_channels=48)
    with pytest.raises(ValueError, match="level_sizes"):
        HQVAEConfig(level_sizes=(512,))


CONV = HQVAEConfig(resolution=32, backbone="conv", channels=(8, 16, 16), dec_res_blocks=1, embed_dim=8,
                   level_sizes=(16, 32))


def test_conv_backbone_grids_round_trip_and_locality():
    """The conv backbone keeps the wiring (top 4x4 + bottom 8x8 at 32 px), decodes every code it writes, and its
    codes are local: pixels more than a cell's margin away never change a cell's top code or its bottom block
    (what the shapes gate's background consistency needs; the taming kernels spread them over ~40 px)."""
    torch.manual_seed(0)
    model = HQVAE(CONV).eval()
    assert (CONV.top_grid, CONV.bottom_downsample) == ((4, 4), 4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rows = lambda z_BDhw, k: z_BDhw.permute(0, 2, 3, 1).reshape(-1, z_BDhw.shape[1])[:k]  # noqa: E731
    with torch.no_grad():  # codebooks drawn from the features themselves, so that random inputs give varied codes
        h_b = model.enc_bottom(x)
        z_t = model.quant_conv_t(model.enc_top(h_b))
        model.quantize_t.embedding.weight.copy_(rows(z_t, 16))
        z_b = model.quant_conv_b(torch.cat([h_b, model.dec_top(model.quantize_t(z_t)[0])], dim=1))
        model.quantize_b.embedding.weight.copy_(rows(z_b, 32))
    enc = model.encode(x)
    assert enc.codes_BN[:, 0::5].unique().numel() > 3 and enc.codes_BN.unique().numel() > 10
    assert enc.codes_BN.shape == (2, 4 * 4 * 5) and enc.grid == (4, 4)
    assert model.decode(enc.codes_BN, enc.grid).shape == (2, 3, 32, 32)
    moved = x.clone()
    moved[:, :, 16:] = torch.rand(2, 3, 16, 32) * 2 - 1  # rows 16.. (top rows 2-3); top row 0 covers pixels 0-7
    codes, codes_moved = enc.codes_BN.view(2, 4, 4, 5), model.encode(moved).codes_BN.view(2, 4, 4, 5)
    assert torch.equal(codes[:, 0], codes_moved[:, 0])  # top row 0 and its bottom blocks: receptive field < 16 px
    assert not torch.equal(codes[:, 3], codes_moved[:, 3])
    with pytest.raises(ValueError, match="backbone"):
        HQVAEConfig(backbone="vit")
    with pytest.raises(ValueError, match="norm"):
        HQVAEConfig(backbone="conv", norm="batch")
    legacy = {k: v for k, v in TINY.to_dict().items() if k != "backbone"}  # a config.json from before the field
    assert HQVAEConfig.from_dict(legacy).backbone == "taming"


def test_encode_decode_shapes_and_ranges(tiny):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    enc = tiny.encode(x)
    assert enc.grid == (4, 4) and enc.codes_BN.shape == (2, 4 * 4 * 5)
    assert torch.equal(enc.levels_N, serialized_levels(16))
    top, bottom = enc.codes_BN[:, enc.levels_N == 0], enc.codes_BN[:, enc.levels_N == 1]
    assert 0 <= int(top.min()) and int(top.max()) < 16 and 0 <= int(bottom.min()) and int(bottom.max()) < 32
    out = tiny.decode(enc.codes_BN, enc.grid)
    assert out.shape == x.shape and torch.equal(out, tiny.decode(enc.codes_BN, enc.grid))
    recon, vq_loss = tiny(x)  # the training forward decodes the same codes
    torch.testing.assert_close(recon.clamp(-1, 1), out)
    assert out.min() >= -1 and out.max() <= 1
    assert vq_loss.requires_grad and vq_loss.item() > 0
    enc_rect = tiny.encode(torch.rand(1, 3, 16, 24) * 2 - 1)
    assert enc_rect.grid == (4, 6) and enc_rect.codes_BN.shape == (1, 120)
    bad = enc.codes_BN.clone()
    bad[0, 1] = 32  # a bottom position
    with pytest.raises(ValueError, match="level 1 codes out of range"):
        tiny.decode(bad, enc.grid)


def test_training_forward_reaches_every_parameter_and_learns():
    torch.manual_seed(0)
    model = HQVAE(TINY).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    recon, vq_loss = model(x)
    (F.mse_loss(recon, x) + vq_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []  # both codebooks, both quant convs, the top decoder and upsample_t are all in the graph
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        recon, vq_loss = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_equality(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "hq")
    loaded = load_image_tokenizer("hqvae", str(tmp_path / "hq"))
    assert isinstance(loaded, HQVAE) and loaded.config == TINY and loaded.checkpoint_hash == tiny.checkpoint_hash
    for (k, v), (k2, v2) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    enc = loaded.encode(x)
    assert torch.equal(enc.codes_BN, tiny.encode(x).codes_BN)
    assert torch.equal(loaded.decode(enc.codes_BN, enc.grid), tiny.decode(enc.codes_BN, enc.grid))
    with pytest.raises(FileNotFoundError, match="config.json"):
        HQVAE.from_checkpoint(tmp_path / "missing")


def test_load_rejects_mismatched_weights(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "hq")
    other = HQVAEConfig(**{**TINY.to_dict(), "num_res_blocks": 2})
    (tmp_path / "hq" / "config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ValueError, match="missing keys"):
        HQVAE.from_checkpoint(tmp_path / "hq")
    (tmp_path / "hq" / "config.json").write_text(json.dumps({**TINY.to_dict(), "colour": 1}))
    with pytest.raises(ValueError, match="unknown HQVAEConfig fields \\['colour'\\]"):
        HQVAE.from_checkpoint(tmp_path / "hq")


# -- metrics ---------------------------------------------------------------------------------------------------
def test_psnr_hand_computed_and_identity():
    a = torch.zeros(1, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 10.0  # MSE = 100 / 4 = 25
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 / 25))
    assert math.isinf(psnr(a, a).item())


def test_ssim_identity_constants_and_single_window():
    x = torch.rand(2, 3, 16, 16) * 255
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # constant images: variances and covariance vanish -> (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = (0.01 * 255) ** 2
    a, b = torch.full((1, 1, 11, 11), 100.0), torch.full((1, 1, 11, 11), 140.0)
    assert ssim(a, b).item() == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1), rel=1e-6)
    # an 11x11 image has exactly one window: the textbook formula with the 2-D Gaussian weights
    rng = np.random.default_rng(0)
    p, q = rng.uniform(0, 255, (11, 11)), rng.uniform(0, 255, (11, 11))
    g = gaussian_window().numpy()
    w = np.outer(g, g)
    mp, mq = (w * p).sum(), (w * q).sum()
    vp, vq, cpq = (w * p * p).sum() - mp**2, (w * q * q).sum() - mq**2, (w * p * q).sum() - mp * mq
    c2 = (0.03 * 255) ** 2
    expected = (2 * mp * mq + c1) * (2 * cpq + c2) / ((mp**2 + mq**2 + c1) * (vp + vq + c2))
    got = ssim(torch.tensor(p).view(1, 1, 11, 11), torch.tensor(q).view(1, 1, 11, 11)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    noisy = (x + 40 * torch.randn_like(x)).clamp(0, 255)
    assert (ssim(x, noisy) < 0.9).all() and ssim(x, noisy, luminance=True).shape == (2,)


def test_usage_and_perplexity():
    counts = torch.tensor([2, 2, 0, 0])
    assert usage_from_counts(counts) == 0.5 and perplexity_from_counts(counts) == pytest.approx(2.0)
    assert perplexity_from_counts(torch.tensor([1, 1, 1, 1, 1])) == pytest.approx(5.0)
    assert perplexity_from_counts(torch.tensor([7, 0])) == pytest.approx(1.0)
    stats = CodeStats((4, 8))
    codes, levels = torch.tensor([[0, 5, 5, 1, 7], [0, 6, 6, 2, 7]]), torch.tensor([0, 1, 1, 0, 1])
    stats.update(codes, levels)
    assert stats.usage() == [0.75, 3 / 8]  # level 0 saw {0, 1, 2}; level 1 saw {5, 6, 7}
    # level 1 counts {5: 2, 6: 2, 7: 2} -> uniform over 3; level 0 counts {0: 2, 1: 1, 2: 1} -> p = (1/2, 1/4, 1/4)
    assert stats.perplexity()[1] == pytest.approx(3.0) and stats.perplexity()[0] == pytest.approx(
        math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    with pytest.raises(ValueError, match="level 0 codes out of range"):
        stats.update(torch.tensor([[4]]), torch.tensor([0]))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(200, 5)))
    m = FeatureMoments()
    m.update(f[:120])
    m.update(f[120:])
    mu, cov = m.mean_cov()
    torch.testing.assert_close(cov, torch.tensor(np.cov(f.numpy(), rowvar=False)))
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([3.0, 1.0])
    d1, d2 = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 1.0])
    expected = 9.0 + float((d1 + d2 - 2 * (d1 * d2).sqrt()).sum())  # diagonal covariances
    assert frechet_distance(mu1, torch.diag(d1), mu2, torch.diag(d2)) == pytest.approx(expected)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T + np.eye(5), b @ b.T + np.eye(5)
    ref = np.trace(c1 + c2 - 2 * np.real(scipy_linalg.sqrtm(c1 @ c2)))
    got = frechet_distance(torch.zeros(5), torch.tensor(c1), torch.zeros(5), torch.tensor(c2))
    assert got == pytest.approx(ref, rel=1e-6)


# -- eval_recon ------------------------------------------------------------------------------------------------
def _image_folder(root, n: int = 8):
    rng = np.random.default_rng(1)
    root.mkdir()
    for i in range(n):
        h, w = 16 + 4 * i, 24 - i
        mode = "RGBA" if i == 3 else "RGB"
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(arr, mode).save(root / f"img_{i}.png")
    return root


class _Lossless(ImageTokenizer):
    """Codes = the uint8 pixel values themselves: a perfect tokenizer for pipeline tests."""

    name = "lossless"
    level_sizes = (256,)

    def preprocess(self, images, grid=None):
        return Preprocessor("fixed", 16, 4).batch(list(images), grid)

    def encode(self, pixels_BCHW):
        codes = ((pixels_BCHW + 1) * 127.5).round().long()
        return EncodedImages(codes.flatten(1), torch.zeros(codes[0].numel(), dtype=torch.long), (3 * 16, 16))

    def decode(self, codes_BN, grid):
        return codes_BN.view(-1, 3, 16, 16).float() / 127.5 - 1


def _scripted_extractor(path, pool: int = 1):
    """A toy stand-in for Inception: 3 * pool**2 features (fewer than the 8 images, so covariances are full rank;
    FID needs more images than feature dimensions, or rank deficiency adds sqrt(eps)-sized noise)."""
    extractor = nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten())
    torch.jit.save(torch.jit.script(extractor), str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # our toy extractor is scripted
def test_evaluate_lossless_tokenizer_is_perfect(tmp_path):
    from data_process.eval_recon import load_feature_extractor

    sources = collect_images(_image_folder(tmp_path / "imgs"))
    extractor = load_feature_extractor(_scripted_extractor(tmp_path / "feat.pt"))
    res = evaluate_reconstruction(_Lossless(), sources, batch_size=3, feature_extractor=extractor)
    assert res["num_images"] == 8 and math.isinf(res["psnr"]) and res["ssim"] == pytest.approx(1.0)
    assert res["rfid"] == pytest.approx(0.0, abs=1e-6)
    assert 0.9 < res["codebook_usage"][0] <= 1.0  # random pixels hit almost every byte value


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # our toy extractor is scripted
def test_eval_recon_cli_on_tiny_hqvae(tmp_path, tiny, capsys):
    ckpt = tiny.save_pretrained(tmp_path / "hq")
    folder = _image_folder(tmp_path / "imgs")
    out = tmp_path / "out" / "recon.json"
    main(tokenizer="hqvae", checkpoint=str(ckpt), images=str(folder), num_images=8, batch_size=3, out=str(out),
         threads=1)
    table = capsys.readouterr().out
    assert "PSNR" in table and "usage L1 (K=32)" in table and "skipped" in table
    saved = json.loads(out.read_text())
    assert saved["num_images"] == 8 and saved["rfid"] is None and saved["rfid_status"].startswith("skipped")
    assert saved["tokenizer"] == tiny.tokenizer_id and len(saved["codebook_usage"]) == 2
    assert all(0 < u <= 1 for u in saved["codebook_usage"]) and all(p >= 1 for p in saved["perplexity"])
    assert 0 < saved["psnr"] < 60 and -1 <= saved["ssim"] <= 1
    assert saved["dataset"] == "imgs" and f"| {tiny.tokenizer_id} | imgs | 8 |" in table  # the markdown row
    with Image.open(out.with_suffix(".png")) as grid:  # 8 references above their reconstructions, 2 px gaps
        assert grid.size == (8 * 16 + 7 * 2, 2 * 16 + 2)
    md = tmp_path / "recon.md"
    with_fid = run("hqvae", str(ckpt), str(folder), num_images=8, batch_size=4, out=str(out),
                   inception_path=str(_scripted_extractor(tmp_path / "feat.pt")), table=str(md), examples=0)
    assert with_fid["rfid"] > 0 and math.isfinite(with_fid["rfid"]) and with_fid["psnr"] == pytest.approx(saved["psnr"])
    run("hqvae", str(ckpt), str(folder), num_images=4, out=str(out), table=str(md), dataset="ffhq", examples=0)
    run("hqvae", str(ckpt), str(folder), num_images=5, out=str(out), table=str(md), examples=0)  # replaces imgs' row
    lines = md.read_text().splitlines()
    assert lines[:2] == TABLE_HEADER.splitlines() and len(lines) == 4
    assert [line.split("|")[2:4] for line in lines[2:]] == [[" ffhq ", " 4 "], [" imgs ", " 5 "]]
    md.write_text("# my notes\n")
    with pytest.raises(ValueError, match="not a table written by eval_recon"):
        run("hqvae", str(ckpt), str(folder), num_images=2, out=str(out), table=str(md), examples=0)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # our toy extractor is scripted
def test_eval_recon_inputs(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    lst = tmp_path / "list.txt"
    lst.write_text("imgs/img_0.png\n\n# comment\nimgs/img_5.png\nimgs/nope.png\n")
    with pytest.raises(FileNotFoundError, match="list.txt:5: image: file not found"):
        collect_images(lst)
    lst.write_text("imgs/img_0.png\nimgs/img_5.png\n")
    assert [s.name.rsplit("/", 1)[-1] for s in collect_images(lst)] == ["img_0.png", "img_5.png"]
    assert len(collect_images(folder, num_images=5)) == 5
    with pytest.raises(FileNotFoundError, match="not found"):
        collect_images(tmp_path / "absent")
    bad = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, bad)
    from data_process.eval_recon import load_feature_extractor

    with pytest.raises(ValueError, match="not a TorchScript module"):
        load_feature_extractor(bad)


def test_eval_recon_reads_a_data_config(tmp_path):
    import tarfile

    import yaml

    _image_folder(tmp_path / "imgs", n=3)
    (tmp_path / "captions.jsonl").write_text("")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i in range(2):
            tf.add(tmp_path / "imgs" / f"img_{i}.png", arcname=f"{i:05d}.png")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"datasets": [
        {"name": "folder", "format": "image_folder", "image_dir": "imgs", "annotations": ["captions.jsonl"]},
        {"name": "tars", "format": "webdataset", "shards": ["shard-*.tar"]},
    ]}))
    sources = collect_images(tmp_path / "data.yaml")
    assert len(sources) == 5 and sources[3].name.endswith("shard-000.tar:00000.png")
    with Image.open(tmp_path / "imgs" / "img_0.png") as im:
        assert np.array_equal(np.asarray(sources[3].load()), np.asarray(im))
