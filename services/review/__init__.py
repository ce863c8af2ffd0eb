"""The review service: reissue applications and the bureau's decisions on them."""
