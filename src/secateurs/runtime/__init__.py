"""What every long-running part shares: progress lines and bars, and the torch thread policy."""
