"""Issuance: cards from the legacy import to production, reissue and pickup."""
