"""Tests of :mod:`lora_monitor.functional`, a module each."""
