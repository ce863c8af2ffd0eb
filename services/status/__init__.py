"""The status projection: card_status and card_timeline read models and the query API."""
