"""DreamBooth's scores: measured on fixed seeds (measure), during a training (during_training), the
checkpoint they pick (pick), and as the model card reports them (report).
"""
