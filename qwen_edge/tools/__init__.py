"""The command-line tools beside the node: chat, fleet, doctor, model."""
