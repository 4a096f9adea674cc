"""guided-diffusion (PGDiff) encoder: loads a checkpoint with the real keys and shapes, taps, numerics."""
import math

import pytest
import torch

from gdrd_fast.models import (DEFAULT_TAP, PGDIFF_FFHQ512, GuidedDiffusionEncoder, UNetConfig, level_end,
                              load_pgdiff_encoder)
from gdrd_fast.models.guided_diffusion import AttentionBlock, timestep_embedding

# Same layout as PGDiff's network (7 levels, res blocks 1,2,2,2,2,3,4, attention on the last three), narrower.
NARROW = UNetConfig(channel_mult=(1, 1, 1, 1, 2, 2, 2))


def guided_diffusion_layout(c: UNetConfig, out_channels=6):
    """Key -> shape of a whole guided-diffusion UNetModel checkpoint (encoder, middle, decoder, out),
    written out from the published layout, independently of the module under test."""
    keys = {}
    emb = 4 * c.model_channels

    def conv(p, cout, cin, k):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (cout, cin, k, k), (cout,)

    def norm(p, ch):
        keys[f"{p}.weight"], keys[f"{p}.bias"] = (ch,), (ch,)

    def res(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        keys[f"{p}.emb_layers.1.weight"], keys[f"{p}.emb_layers.1.bias"] = (2 * cout, emb), (2 * cout,)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def attn(p, ch):
        norm(f"{p}.norm", ch)
        keys[f"{p}.qkv.weight"], keys[f"{p}.qkv.bias"] = (3 * ch, ch, 1), (3 * ch,)
        keys[f"{p}.proj_out.weight"], keys[f"{p}.proj_out.bias"] = (ch, ch, 1), (ch,)

    keys["time_embed.0.weight"], keys["time_embed.0.bias"] = (emb, c.model_channels), (emb,)
    keys["time_embed.2.weight"], keys["time_embed.2.bias"] = (emb, emb), (emb,)
    ch = c.model_channels * c.channel_mult[0]
    conv("input_blocks.0.0", ch, 3, 3)
    skips, n, res_at = [ch], 1, c.image_size
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks[level]):
            res(f"input_blocks.{n}.0", ch, mult * c.model_channels)
            ch = mult * c.model_channels
            if res_at in c.attention_resolutions:
                attn(f"input_blocks.{n}.1", ch)
            skips.append(ch)
            n += 1
        if level < len(c.channel_mult) - 1:
            conv(f"input_blocks.{n}.0.op", ch, ch, 3)
            skips.append(ch)
            n, res_at = n + 1, res_at // 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(c.channel_mult))):
        for i in range(c.num_res_blocks[level] + 1):
            cout = c.model_channels * c.channel_mult[level]
            res(f"output_blocks.{n}.0", ch + skips.pop(), cout)
            ch, sub = cout, 1
            if res_at in c.attention_resolutions:
                attn(f"output_blocks.{n}.1", ch)
                sub = 2
            if level and i == c.num_res_blocks[level]:
                conv(f"output_blocks.{n}.{sub}.conv", ch, ch, 3)
                res_at *= 2
            n += 1
    norm("out.0", ch)
    conv("out.2", out_channels, c.model_channels * c.channel_mult[0], 3)
    return keys


def checkpoint(layout, decoder_values=True):
    """'module.'-prefixed, as the released file. Without decoder_values the decoder holds zero-stride
    tensors of the right shape (the loader must drop them anyway) to keep a full-size test small."""
    def value(k, shape):
        if not decoder_values and k.startswith(("output_blocks.", "out.")):
            return torch.zeros(()).expand(shape)
        return torch.randn(shape) * 0.05
    return {f"module.{k}": value(k, shape) for k, shape in layout.items()}


def test_pgdiff_config_block_indices_match_method_md():
    assert DEFAULT_TAP == "input_blocks.17" == f"input_blocks.{level_end(PGDIFF_FFHQ512, 5)}"
    assert [level_end(PGDIFF_FFHQ512, lv) for lv in range(7)] == [1, 4, 7, 10, 13, 17, 22]
    layout = guided_diffusion_layout(PGDIFF_FFHQ512)
    downsamples = sorted(int(k.split(".")[1]) for k in layout if k.endswith(".op.weight"))
    assert downsamples == [2, 5, 8, 11, 14, 18]
    attention = sorted({int(k.split(".")[1]) for k in layout if k.startswith("input_blocks") and ".1.qkv." in k})
    assert attention == [12, 13, 15, 16, 17, 19, 20, 21, 22]
    assert layout["input_blocks.17.0.out_layers.3.weight"] == (512, 512, 3, 3)


def test_narrow_checkpoint_file_loads_strictly_and_taps(tmp_path):
    layout = guided_diffusion_layout(NARROW)
    state = checkpoint(layout)
    path = tmp_path / "iddpm_narrow.pth"
    torch.save(state, path)
    for tap, channels, stride in ((DEFAULT_TAP, 64, 32), ("middle_block", 64, 64), ("input_blocks.4", 32, 2)):
        encoder = load_pgdiff_encoder(path, tap=tap, config=NARROW).eval()
        own = encoder.state_dict()
        assert own and all(torch.equal(v, state["module." + k]) for k, v in own.items())
        with torch.no_grad():
            out = encoder(torch.randn(2, 3, 128, 128))
        assert out.shape == (2, channels, 128 // stride, 128 // stride)
        assert (encoder.out_channels, encoder.stride) == (channels, stride)
        assert torch.isfinite(out).all()


def test_bad_checkpoints_are_refused_by_key():
    layout = guided_diffusion_layout(NARROW)
    state = checkpoint(layout)
    del state["module.input_blocks.16.1.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: input_blocks\.16\.1\.qkv\.weight"):
        load_pgdiff_encoder(state, config=NARROW)
    state = checkpoint(layout)
    state["module.label_emb.weight"] = torch.zeros(10, 128)
    with pytest.raises(ValueError, match=r"unexpected keys: label_emb\.weight"):
        load_pgdiff_encoder(state, config=NARROW)
    with pytest.raises(ValueError, match=r"shape mismatches: .*input_blocks\.15\."):  # a wider level 5
        load_pgdiff_encoder(checkpoint(guided_diffusion_layout(UNetConfig(channel_mult=(1, 1, 1, 1, 2, 4, 4)))),
                            config=NARROW)
    with pytest.raises(ValueError, match="tap must be"):
        GuidedDiffusionEncoder(NARROW, tap="output_blocks.3")


@pytest.mark.slow
def test_full_size_pgdiff_checkpoint_gives_512x14x14_at_448():
    encoder = load_pgdiff_encoder(checkpoint(guided_diffusion_layout(PGDIFF_FFHQ512), decoder_values=False)).eval()
    with torch.no_grad():
        out = encoder(torch.rand(1, 3, 448, 448) * 2 - 1)
    assert out.shape == (1, 512, 14, 14) and torch.isfinite(out).all()
    assert (encoder.out_channels, encoder.stride) == (512, 32)


def test_attention_uses_the_legacy_head_by_head_qkv_order():
    block = AttentionBlock(128, num_head_channels=64).double()
    x = torch.randn(2, 128, 3, 5, dtype=torch.float64)
    b, c, heads, ch = 2, 128, 2, 64
    qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
    q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)  # each head owns a [q; k; v] slab
    w = torch.softmax(torch.einsum("nct,ncs->nts", q, k) / math.sqrt(ch), dim=-1)
    h = torch.einsum("nts,ncs->nct", w, v).reshape(b, c, -1)
    expected = (x.reshape(b, c, -1) + block.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 6)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = torch.tensor([[1, 1, 1, 0, 0, 0],
                             [*(math.cos(3 * f) for f in freqs), *(math.sin(3 * f) for f in freqs)]])
    torch.testing.assert_close(emb, expected.float())
