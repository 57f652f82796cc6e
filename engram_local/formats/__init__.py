"""Files, no torch: one module per kind of file or rule.

  header        GGUF header scan of files and bytes (scan_gguf, scan_gguf_bytes, GGUFHeader,
                GGUFFormatError), typed fields, file_kind
  sidecar       the Engram sidecar (open_sidecar, Sidecar)
  fingerprint   the model fingerprint's byte stream (sidecar files and in-memory models)
  lora_adapter  llama.cpp LoRA adapter files (read_lora_adapter, check_lora_header)
  eov           user memory (.eov) files: checked read/write, the override-stack opener `open_overrides`
  sealed        optional encryption at rest of memory files (AES-256-GCM, `cryptography`)
  table         memory tables of any GGUF file through gguf-py
  describe      what a file holds, for `engram-local inspect`
  config        the Engram's settings (EngramConfig)
"""
