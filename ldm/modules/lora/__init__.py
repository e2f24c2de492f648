"""LoRA: low-rank weight deltas (kohya / web-UI and diffusers / PEFT files) merged into a model, and undone."""
from ldm.modules.lora.files import LoraError, LoraFile, read_lora
from ldm.modules.lora.merge import LoraSpec, MergedLoras, check_loras, merge_loras
from ldm.modules.lora.prompt import LoraSession, parse_lora_flag, prompt_loras, strip_tags

__all__ = ["LoraError", "LoraFile", "LoraSession", "LoraSpec", "MergedLoras", "check_loras", "merge_loras",
           "parse_lora_flag", "prompt_loras", "read_lora", "strip_tags"]
