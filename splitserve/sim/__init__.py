"""A discrete-event simulator of splitserve layouts, driven by ``splitserve profile`` profiles
(``splitserve sim``)."""
