"""Typed settings: the names the command line offers, checked value types, and the declarations
that the library checks keywords against and the command line builds its flags from. No torch here."""
