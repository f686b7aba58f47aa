"""OpenAI's modified ResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64).

Differences from torchvision's ResNet, as in OpenAI's CLIP: a stem of three 3x3 convolutions with an average pool
instead of a max pool; anti-aliased strides (an average pool before the stride-1 convolution instead of a strided
convolution, in the bottleneck and in its downsample branch); and a final attention pool in place of the global
average pool. Module names and parameter shapes equal open_clip's ``ModifiedResNet``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from fastclip.models.transformer import _check_attn_impl, attend


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool if stride > 1) -> 1x1 (x4 channels), plus an identity or avgpool+1x1 shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # the key names "-1", "0", "1" are OpenAI's
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling over a (B, C, h, w) feature map -> (B, output_dim).

    The tokens are the mean of the map followed by its h*w positions, plus a learned positional embedding
    (h*w + 1, C); multi-head attention (separate q/k/v projections, OpenAI's layout) runs over them, and the output
    at the mean token, projected by c_proj, is the image feature.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int = None,
                 attn_impl: str = "fastclip"):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.attn_impl = _check_attn_impl(attn_impl)

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[0], x.shape[1]
        x = x.reshape(B, C, -1).transpose(1, 2)  # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, hw + 1, C)
        x = x + self.positional_embedding.to(x.dtype)
        L, H = x.shape[1], self.num_heads
        # all L queries are computed, as in OpenAI's model, although only the first is used: at L = 50 this costs
        # little and keeps q, k and v the same length for the kernel
        q = self.q_proj(x).view(B, L, H, C // H)  # (B, L, H, D)
        k = self.k_proj(x).view(B, L, H, C // H)
        v = self.v_proj(x).view(B, L, H, C // H)
        out = attend(q, k, v, self.attn_impl)  # (B, L, H, D)
        return self.c_proj(out[:, 0].reshape(B, C))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """image (B, 3, S, S) -> (B, output_dim); S is ``image_size`` (the attention pool's grid is S / 32).

    With ``output_tokens`` it returns ((B, output_dim), layer4 features as tokens (B, (S/32)^2, width * 32)).
    """

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64,
                 attn_impl: str = "fastclip", output_tokens: bool = False):
        super().__init__()
        self.output_dim = output_dim
        self.image_size = image_size
        self.output_tokens = output_tokens
        # the three-convolution stem
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        # residual stages
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim, attn_impl)
        self.init_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        """OpenAI's: normal(in_features^-0.5) attention-pool projections; zero last BN scale in each bottleneck."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # not supported, as in open_clip: recomputing a BatchNorm in train mode would update its statistics twice
        pass

    def stem(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.stem(x.to(self.conv1.weight.dtype))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 width, S/32, S/32)
        return self.attnpool(x), x.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor):
        pooled, tokens = self.forward_features(x)
        return (pooled, tokens) if self.output_tokens else pooled


__all__ = ["Bottleneck", "AttentionPool2d", "ModifiedResNet"]
