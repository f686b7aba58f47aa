"""CLIP and SigLIP towers that load OpenAI and OpenCLIP checkpoints, built from open_clip's configs: ViT, text
transformer, OpenAI's modified ResNet, SigLIP's timm ViT (without timm).

    model = fastclip.create_model("ViT-B-32-quickgelu", pretrained="ViT-B-32.pt")   # OpenAI's archive
    model = fastclip.create_model("ViT-B-16-SigLIP", pretrained="open_clip_model.safetensors")
    model = fastclip.create_model_from_state_dict(torch.load("open_clip_pytorch_model.bin"), "ViT-B-32")
    model = fastclip.from_open_clip(open_clip_model)       # and fastclip.to_open_clip(model)
"""
from fastclip.models.configs import (MODEL_CONFIGS, TIMM_VITS, TextCfg, VisionCfg, add_model_config,
                                     get_model_config, list_models)
from fastclip.models.convert import from_open_clip, open_clip_config, to_open_clip
from fastclip.models.factory import (CheckpointError, clean_state_dict, create_model, create_model_from_state_dict,
                                     infer_config, load_checkpoint, read_checkpoint, resize_pos_embed)
from fastclip.models.model import CLIP, CustomTextCLIP, build_model_from_config, convert_weights_to_lp, set_precision
from fastclip.models.modified_resnet import ModifiedResNet
from fastclip.models.timm_vit import SiglipViT, TimmVisionTower
from fastclip.models.transformer import Attention, LayerNorm, QuickGELU, TextTransformer, VisionTransformer

__all__ = ["CLIP", "CustomTextCLIP", "VisionTransformer", "TextTransformer", "ModifiedResNet", "SiglipViT",
           "TimmVisionTower", "Attention", "LayerNorm", "QuickGELU", "VisionCfg", "TextCfg", "MODEL_CONFIGS",
           "TIMM_VITS", "list_models", "get_model_config", "add_model_config", "create_model",
           "create_model_from_state_dict", "build_model_from_config", "infer_config", "load_checkpoint",
           "read_checkpoint", "clean_state_dict", "resize_pos_embed", "CheckpointError", "convert_weights_to_lp",
           "set_precision", "from_open_clip", "to_open_clip", "open_clip_config"]
