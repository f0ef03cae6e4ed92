"""Tests of :mod:`lora_monitor.integrations`, a module each."""
