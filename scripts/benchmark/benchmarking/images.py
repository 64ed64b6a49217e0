"""The benchmark's input images, and how two outputs are compared."""
import torch
import torch.nn.functional as F


def random_images(batch, height, width, device, seed):
    """Smooth random RGB images in [0, 1]: (B, 3, H, W) (noise upsampled, so not pure noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 8), max(2, width // 8), generator=generator)
    img = F.interpolate(coarse, size=(height, width), mode='bilinear', align_corners=False)
    img = (img + 0.1 * torch.rand(batch, 3, height, width, generator=generator)).clamp_(0, 1)
    return img.to(device)


def photo(height, width, device):
    """scikit-image's astronaut, resized (bicubic, antialiased) to (1, 3, height, width) RGB in [0, 1]."""
    from skimage import data as skdata
    img = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(height, width), mode='bicubic', antialias=True, align_corners=False)
    return img.clamp_(0, 1).to(device)


def psnr_y(img, ref):
    """PSNR on the Y channel of 8-bit images, as the metrics of the test pipeline compute it."""
    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    return float(calculate_psnr(tensor2img(img.float().cpu().clamp(0, 1)), tensor2img(ref.float().cpu()),
                                crop_border=0, test_y_channel=True))


def max_abs_diff(a, b):
    """The largest absolute difference of two tensors, in float32."""
    return float((a.float() - b.float()).abs().max())
