"""The node: the daemon that serves a model over MQTT (`qwen-edge serve`)."""
