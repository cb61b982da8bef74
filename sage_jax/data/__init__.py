"""Data: corpus readers, mixing, chat-template tokenization with loss masks, Grain pipeline, TFDS."""
