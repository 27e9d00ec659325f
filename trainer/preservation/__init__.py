"""Prior preservation, two ways: class images the base model draws (class_images), or the base
model's own predictions on the photos' noisy latents (base_prediction).
"""
