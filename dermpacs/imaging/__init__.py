"""Reading photographs and writing SEG, SR and overlay: pure functions, no I/O."""
