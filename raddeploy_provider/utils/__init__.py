"""Small pieces the provider's operators, sensors and triggers share."""
