"""CLIP towers that load OpenAI and OpenCLIP checkpoints: ViT, text transformer, OpenAI's modified ResNet.

    model = fastclip.create_model("ViT-B-32-quickgelu", pretrained="ViT-B-32.pt")   # OpenAI's archive
    model = fastclip.create_model_from_state_dict(torch.load("open_clip_pytorch_model.bin"), quick_gelu=False)
"""
from fastclip.models.configs import MODEL_CONFIGS, TextCfg, VisionCfg, get_model_config, list_models
from fastclip.models.factory import (CheckpointError, create_model, create_model_from_state_dict, infer_config,
                                     load_checkpoint, read_checkpoint)
from fastclip.models.model import CLIP, convert_weights_to_lp, set_precision
from fastclip.models.modified_resnet import ModifiedResNet
from fastclip.models.transformer import Attention, LayerNorm, QuickGELU, TextTransformer, VisionTransformer

__all__ = ["CLIP", "VisionTransformer", "TextTransformer", "ModifiedResNet", "Attention", "LayerNorm", "QuickGELU",
           "VisionCfg", "TextCfg", "MODEL_CONFIGS", "list_models", "get_model_config", "create_model",
           "create_model_from_state_dict", "infer_config", "load_checkpoint", "read_checkpoint", "CheckpointError",
           "convert_weights_to_lp", "set_precision"]
