"""Method configs: `configs/methods/<method>.py:<dataset>[,<preset>...]`."""
