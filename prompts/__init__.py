"""Prompt templates, shipped inside the wheel as ``segrec.prompts``; see segrec.templates."""
