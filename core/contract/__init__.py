"""What plugins implement and the host calls: hook specifications, strategy protocols, errors."""
