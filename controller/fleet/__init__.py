"""The fleet as the controller sees it: the device registry fed by retained
status, and how commands open it."""
