"""Will a training fit? The prediction (estimate), from the parts' shapes (shapes) and traced
activations (trace, profiles); what to change when it does not (advice); and the frozen parts that
wait in CPU RAM during the steps (parking).
"""
