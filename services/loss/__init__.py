"""The loss service: temporary and formal loss of a card, cancellation, expiry, freeze."""
