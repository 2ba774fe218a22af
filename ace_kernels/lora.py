"""placeholder: being written"""
def lora_linear(*a, **k): raise NotImplementedError
def lora_qkv(*a, **k): raise NotImplementedError
