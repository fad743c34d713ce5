"""The nemesis campaign: kiq on several network-namespace hosts under seeded faults, and its checker."""
