"""PatchGAN discriminator for VQGAN training (stage 0), as in taming-transformers.

Parameter names equal those of taming's ``NLayerDiscriminator`` (``main.0.weight``, ...), which a
taming ``.ckpt`` stores under ``loss.discriminator.``; strip that prefix to load one
(``load_weights(net, path, key_map={'loss.discriminator.': ''})``).
"""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation whose scale and shift are set from the first training batch
    (data-dependent init, Glow), then learned. (B, C, H, W) -> (B, C, H, W).

    Parameters ``loc``/``scale`` are (1, C, 1, 1) and the buffer ``initialized`` is a uint8 flag,
    as in taming.
    """

    def __init__(self, num_features):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer('initialized', torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
        self.scale.copy_(1 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x):
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def taming_weights_init(module):
    """taming's init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0)


@ARCH_REGISTRY.register()
class PatchGANDiscriminator(nn.Module):
    """Pix2Pix PatchGAN: strided 4x4 convs give one real/fake logit per overlapping image patch.

    Args:
        input_nc: image channels.
        ndf: channels of the first conv (doubled per layer, at most 8x).
        n_layers: number of stride-2 convs (3: 70x70 patches).
        use_actnorm: ActNorm instead of BatchNorm (convs then keep their bias).

    (B, input_nc, H, W) -> (B, 1, H/2**n_layers - 2, W/2**n_layers - 2); for n_layers 3 and a
    256x256 input, (B, 1, 30, 30).
    """

    def __init__(self, input_nc=3, ndf=64, n_layers=3, use_actnorm=False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's affine shift makes a conv bias redundant

        layers = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            mult_prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * mult_prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, True)
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(taming_weights_init)

    def forward(self, x):
        return self.main(x)
