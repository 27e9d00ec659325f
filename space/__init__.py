"""The Gradio UI of DreamBooth Studio: tabs that call the trainer engine, never the reverse."""
