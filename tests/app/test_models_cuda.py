"""The model zoo on a GPU: same results as on CPU, and insightface's fp16 trunk (run by benchmarks/gpu/run.sh)."""
import pytest
import torch

from gdrd_fast.models import ArcFaceHead, GuidedDiffusionEncoder, UNetConfig, get_model

pytestmark = pytest.mark.cuda


@pytest.fixture
def no_tf32():
    """cuDNN convolutions and cuBLAS matmuls in full fp32, restored after the test. By hand: torch's flag
    modules have no delattr, which monkeypatch's undo may call (pytest 9.2 does)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_guided_diffusion_encoder_matches_cpu(no_tf32):
    # cuDNN convolutions default to TF32 (10-bit mantissa): through a deep UNet that alone would exceed 1e-3
    encoder = GuidedDiffusionEncoder(UNetConfig(channel_mult=(1, 1, 1, 1, 2, 2, 2)), tap="middle_block").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = encoder(x)
        got = encoder.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_iresnet_fp16_trunk_on_gpu_is_close_to_fp32():
    net = get_model("r18").cuda().eval()
    half = get_model("r18", fp16=True).cuda().eval()
    half.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 112, 112, device="cuda")
    with torch.no_grad():
        out, expected = half(x), net(x)
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.02 * expected.abs().max()


def test_arcface_head_under_autocast_gives_fp32_logits():
    head = ArcFaceHead(512, 1000).cuda()
    labels = torch.randint(0, 1000, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        margin, plain = head(torch.randn(8, 512, device="cuda", dtype=torch.float16), labels)
    assert margin.dtype == plain.dtype == torch.float32 and torch.isfinite(margin).all()
