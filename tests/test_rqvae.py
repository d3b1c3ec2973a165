"""RQ-VAE: depth-first serialisation, the residual quantiser against a hand computation, the exact
encode -> serialise -> token ids -> deserialise -> decode round trip through CodeVocab, EMA training, strict loading."""

import json

import pytest
import torch

from modeling.vocab import CodeVocab
from modeling.vq import load_image_tokenizer
from modeling.vq.rqvae import RQVAE, RQVAEConfig, ResidualQuantizer, deserialize, serialize, serialized_levels

TINY = RQVAEConfig(image_size=16, channels=(8, 16, 16), dec_res_blocks=1, depth=3, codebook_size=16, code_dim=4)


@pytest.fixture()
def tiny() -> RQVAE:
    torch.manual_seed(0)
    model = RQVAE(TINY)
    model.train()
    model(torch.rand(8, 3, 16, 16) * 2 - 1)  # one EMA step: codebook entries restarted onto encoder vectors
    return model.eval()


def test_serialize_depth_first_by_hand_and_round_trip():
    codes = torch.tensor([[[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]])  # B=1, 2x2 grid, depth 3
    flat, levels = serialize(codes)
    assert flat.tolist() == [list(range(1, 13))]  # position (0,0) depths 0..2, then (0,1), (1,0), (1,1)
    assert levels.tolist() == [0, 1, 2] * 4
    assert torch.equal(deserialize(flat, (2, 2), 3), codes)
    rect = torch.randint(0, 99, (3, 3, 5, 4))
    assert torch.equal(deserialize(serialize(rect)[0], (3, 5), 4), rect)
    assert serialize(torch.zeros(1, 8, 8, 4, dtype=torch.long))[0].shape == (1, 256)  # the 4 x 8x8 default
    with pytest.raises(ValueError, match=r"\(B, 36\)"):
        deserialize(flat, (3, 3), 4)


def test_residual_quantizer_matches_hand_computation():
    cfg = RQVAEConfig(image_size=8, channels=(8, 8), depth=2, codebook_size=3, code_dim=2)
    rq = ResidualQuantizer(cfg).eval()
    rq.codebooks[0].embed_KD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.25, 0.25]]))
    z = torch.tensor([1.2, 0.3]).view(1, 2, 1, 1)
    q, codes, commit = rq(z)
    # depth 0: nearest to (1.2, 0.3) is (1, 0); residual (0.2, 0.3): nearest (0.25, 0.25); sum (1.25, 0.25)
    assert codes.view(-1).tolist() == [0, 2]
    torch.testing.assert_close(q.view(-1), torch.tensor([1.25, 0.25]))
    expected = ((torch.tensor([0.2, 0.3]) ** 2).mean() + (torch.tensor([-0.05, 0.05]) ** 2).mean()) / 2
    torch.testing.assert_close(commit, expected)
    per_depth = ResidualQuantizer(RQVAEConfig(image_size=8, channels=(8, 8), depth=2, codebook_size=3, code_dim=2,
                                              shared_codebook=False))
    assert len(per_depth.codebooks) == 2 and len(rq.codebooks) == 1


def test_encode_decode_round_trip_through_code_vocab(tiny):
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    enc = tiny.encode(x)
    assert enc.grid == (4, 4) and enc.codes_BN.shape == (4, 4 * 4 * 3)
    assert torch.equal(enc.levels_N, tiny.code_levels(enc.grid)) and torch.equal(enc.levels_N, serialized_levels(16, 3))
    assert tiny.level_sizes == (16, 16, 16)
    vocab = CodeVocab(image_offset=100, level_sizes=tiny.level_sizes, vision_start_id=1, vision_end_id=2)
    ids = vocab.codes_to_ids(enc.codes_BN.numpy().reshape(-1), levels=enc.levels_N.numpy().repeat(1).tolist() * 4)
    assert ids.min() >= 100 and ids.max() < 100 + 48
    codes_back, levels_back = vocab.ids_to_codes(ids)
    assert (codes_back == enc.codes_BN.numpy().reshape(-1)).all() and levels_back.tolist() == enc.levels_N.tolist() * 4
    out = tiny.decode(torch.from_numpy(codes_back).view(4, -1), enc.grid)
    recon = tiny(x).recon_BCHW.clamp(-1, 1)  # the training forward (eval mode) decodes the same latent
    assert torch.equal(out, tiny.decode(enc.codes_BN, enc.grid))
    torch.testing.assert_close(out, recon)
    assert torch.equal(tiny.encode(out * 0 + x).codes_BN, enc.codes_BN)  # encoding moved no codebook entry
    bad = enc.codes_BN.clone()
    bad[0, 2] = 16
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        tiny.decode(bad, enc.grid)


def test_ema_training_learns_and_deeper_codes_refine():
    torch.manual_seed(0)
    model = RQVAE(TINY).train()
    # smooth images (4x4 colour patches): learnable by a 16 px stack in a few dozen steps, unlike white noise
    x = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4) * 2 - 1, size=16, mode="nearest")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.quantizer.codebooks[0].embed_KD.clone()
    losses = []
    for _ in range(60):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.recon_loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(before, model.quantizer.codebooks[0].embed_KD)  # the EMA moved the (buffer) codebook
    assert "quantizer.codebooks.0.embed_KD" not in dict(model.named_parameters())
    model.eval()
    z = model.encoder(x)
    _, codes, _ = model.quantizer(z)
    errs, q = [], torch.zeros_like(z)
    for d in range(TINY.depth):  # reconstruction error of the latent after 1, 2, 3 depths
        q = q + model.quantizer.book(d).lookup(codes[..., d]).permute(0, 3, 1, 2)
        errs.append(float((z - q).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]


def test_save_load_strict(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "rq")
    loaded = load_image_tokenizer("rqvae", str(tmp_path / "rq"))
    assert isinstance(loaded, RQVAE) and loaded.config == TINY and loaded.checkpoint_hash == tiny.checkpoint_hash
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    enc = loaded.encode(x)
    assert torch.equal(enc.codes_BN, tiny.encode(x).codes_BN)
    assert torch.equal(loaded.decode(enc.codes_BN, enc.grid), tiny.decode(enc.codes_BN, enc.grid))
    (tmp_path / "rq" / "config.json").write_text(json.dumps({**TINY.to_dict(), "shared_codebook": False}))
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):
        load_image_tokenizer("rqvae", str(tmp_path / "rq"))
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py --kind rqvae"):
        load_image_tokenizer("rqvae", str(tmp_path / "missing"))
