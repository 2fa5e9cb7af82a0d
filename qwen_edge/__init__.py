"""qwen-edge: a local chat model that streams its replies over MQTT."""
