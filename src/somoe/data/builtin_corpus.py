"""A built-in generator of simple children's stories in the TinyStories style.

It makes the package usable offline and gives tests real-looking text: named
characters (kids and animals), places, objects, feelings, quoted dialogue and
a problem -> attempt -> resolution plot with a closing moral, drawn from ten
plot templates with several wording variants per sentence.

Story ``i`` is drawn from its own ``random.Random`` seeded by ``(seed, i)``,
so it never depends on how many stories are requested (``generate_stories(100, s)``
is a prefix of ``generate_stories(1000, s)``) and the global RNG is untouched.
Bump ``GENERATOR_VERSION`` on any change to the text: it is part of the cache key.
"""

from __future__ import annotations

import random

GENERATOR_VERSION = 1

GIRLS = ["Lily", "Mia", "Anna", "Sue", "Lucy", "Emma", "Zoe", "Sara", "Amy", "Ella", "Rosie", "Jane", "Kim",
         "Molly", "Nora", "Ruby", "Grace", "Chloe", "Maya", "Ivy", "Lola", "Sophie", "Hannah", "Tara"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Jake", "Joe", "Finn", "Noah", "Alex", "Ryan",
        "Oliver", "Luke", "Dan", "Bob", "Eli", "Ollie", "Billy", "Henry", "Owen", "Kai", "Theo"]
ANIMALS = ["cat", "dog", "bunny", "bird", "bear", "frog", "duck", "mouse", "fox", "squirrel", "turtle",
           "lion", "elephant", "pig", "owl", "puppy", "kitten", "monkey", "horse", "sheep", "hen", "deer"]
PET_NAMES = ["Whiskers", "Buddy", "Pip", "Coco", "Rusty", "Bella", "Milo", "Luna", "Oscar", "Bubbles", "Spot",
             "Fluffy", "Sunny", "Pepper", "Tiny", "Hoppy", "Nutty", "Shelly", "Ziggy", "Benny", "Dot", "Patch",
             "Ginger", "Biscuit", "Pebble", "Honey", "Toby", "Rocky"]
TRAITS = ["little", "happy", "curious", "brave", "kind", "shy", "silly", "clever", "friendly", "small",
          "cheerful", "playful", "gentle", "busy"]
# (where it happens, going there, hiding spots there)
PLACES = [
    ("in the park", "to the park", ["under the slide", "behind a big tree", "near the swings", "in the tall grass"]),
    ("in the forest", "to the forest",
     ["under a pile of leaves", "behind an old log", "next to a red mushroom", "in a hollow tree"]),
    ("in the garden", "to the garden",
     ["under the roses", "behind the watering can", "next to the carrots", "in a flower pot"]),
    ("at the beach", "to the beach", ["under the sand", "behind a big rock", "next to a pink shell", "by the water"]),
    ("on the farm", "to the farm", ["in the hay", "behind the barn", "next to the pig pen", "under the old tractor"]),
    ("by the pond", "to the pond",
     ["under a lily pad", "in the reeds", "behind a mossy stone", "near the little bridge"]),
    ("in the backyard", "to the backyard",
     ["under the porch", "behind the fence", "in the sandbox", "next to the shed"]),
    ("in the meadow", "to the meadow", ["among the daisies", "behind a hay bale", "under a bush", "near the old well"]),
    ("at the playground", "to the playground",
     ["under the seesaw", "in the sandpit", "behind the climbing frame", "near the gate"]),
    ("on the big hill", "up the big hill",
     ["behind a rock", "under a lonely tree", "in the long grass", "near the top"]),
    ("by the river", "to the river", ["between two stones", "under the bridge", "in the muddy bank", "next to a boat"]),
    ("at home", "home", ["under the bed", "behind the sofa", "in the toy box", "next to the front door"]),
    ("at school", "to school", ["under a desk", "behind the bookshelf", "in the coat room", "next to the window"]),
    ("at the zoo", "to the zoo",
     ["near the monkey house", "under a bench", "behind the ice cream cart", "by the lake"]),
]
HUES = ["red", "blue", "green", "yellow", "pink", "purple", "orange"]
COLORS = HUES + ["shiny", "soft", "old", "little", "big"]
OBJECTS = ["ball", "kite", "toy car", "teddy bear", "hat", "balloon", "boat", "doll", "drum", "book", "shovel",
           "bucket", "scarf", "ring", "truck", "train", "robot", "whistle", "blanket", "bike", "crayon", "cup"]
HELPERS = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother", "teacher", "aunt", "uncle"]
HAPPY = ["happy", "glad", "excited", "proud", "joyful"]
SAD = ["sad", "upset", "worried", "unhappy", "gloomy"]
WEATHER = ["The sun was shining and the birds were singing.", "It was a warm and sunny day.",
           "The sky was blue and the wind was soft.", "It was a bright morning.",
           "The air was cool and fresh.", "Fluffy white clouds floated in the sky."]
LIKES = ["play with {his} {obj}", "run and jump", "sing songs", "look at the clouds", "draw pictures",
         "build things with blocks", "splash in puddles", "pick flowers", "read books", "dance in the sun",
         "play hide and seek", "chase butterflies"]
TOGETHER = ["played together", "laughed and played", "ran and played", "had lots of fun", "played games"]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Char:
    """A story character with pronouns; ``intro`` is its first mention."""

    __slots__ = ("name", "noun", "he", "him", "his", "self_", "intro")

    def __init__(self, r: random.Random, avoid: str = ""):
        female = r.random() < 0.5
        if r.random() < 0.6:
            self.noun = "girl" if female else "boy"
            pool = GIRLS if female else BOYS
        else:
            self.noun, pool = r.choice(ANIMALS), PET_NAMES
        self.name = r.choice([n for n in pool if n != avoid] if avoid in pool else pool)
        self.he, self.him, self.his = ("she", "her", "her") if female else ("he", "him", "his")
        self.self_ = "herself" if female else "himself"
        self.intro = f"{_a(r.choice(TRAITS))} {self.noun} named {self.name}"

    @property
    def He(self) -> str:  # noqa: N802 - reads like the sentence-initial pronoun it is
        return _cap(self.he)

    @property
    def His(self) -> str:  # noqa: N802
        return _cap(self.his)


class _Ctx:
    """Everything one story is about, drawn up front from its RNG."""

    def __init__(self, r: random.Random):
        self.r = r
        self.h = _Char(r)
        self.f = _Char(r, avoid=self.h.name)
        self.where, self.to, spots = r.choice(PLACES)
        self.spots = r.sample(spots, 3)
        self.color = r.choice(COLORS)
        self.obj = r.choice(OBJECTS)
        self.thing = f"{self.color} {self.obj}"
        self.helper = r.choice(HELPERS)

    def pick(self, *options: str) -> str:
        return self.r.choice(options)

    def opening(self) -> str:
        h, p = self.h, self.pick
        first = p(f"Once upon a time, there was {h.intro}.",
                  f"Once upon a time, in a small town, there lived {h.intro}.",
                  f"There once was {h.intro}.",
                  f"One day, {h.intro} woke up early.",
                  f"Long ago, there was {h.intro} who lived near a big forest.")
        like = self.r.choice(LIKES).format(his=h.his, obj=self.obj)
        second = p(f"{h.He} loved to {like}.", f"Every day, {h.name} liked to {like}.",
                   f"More than anything, {h.he} liked to {like}.")
        return f"{first} {second}"

    def weather(self) -> str:
        return self.r.choice(WEATHER)


# --- plot templates: each returns a list of paragraphs --------------------------------------
def _lost(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    s1, s2, s3 = c.spots
    shade = f" {c.color}" if c.color in HUES else ""  # "something red", not "something little"
    return [
        f"{c.opening()} {h.His} favorite toy was {_a(c.thing)}.",
        f"One day, {h.name} took the {c.obj} {c.to}. {c.weather()} {h.He} played and played. "
        + p(f"But when {h.he} looked around, the {c.obj} was gone!",
            f"Then {h.he} turned around and the {c.obj} was not there anymore!")
        + f" {h.name} felt very {p(*SAD)}. \"{p('Oh no', 'Oh dear', 'Help')}! Where is my {c.obj}?\" {h.he} cried.",
        f"{_cap(f.intro)} heard {h.him}. " + p(f"\"Don't worry, I will help you look,\" {f.he} said.",
                                               f"\"I can help you find it!\" {f.he} said with a smile.")
        + f" They looked {s1}, but it was not there. They looked {s2}, but it was not there either."
        + f" Then {f.name} saw something{shade} {s3}. It was the {c.obj}!",
        f"{h.name} was so {p(*HAPPY)}. \"Thank you, {f.name}!\" {h.he} said, and gave {f.him} a big hug. "
        + p(f"From that day on, {h.name} and {f.name} were best friends.",
            f"{h.name} learned that good friends always help each other.",
            f"After that, {h.name} always kept {h.his} {c.obj} close.",
            f"They {c.r.choice(TOGETHER)} with the {c.obj} until the sun went down."),
    ]


def _sharing(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    return [
        f"{c.opening()} {h.He} had {_a(c.thing)}. It was {h.his} favorite thing in the whole world.",
        f"One day, {f.intro} came to play {c.where}. {f.name} saw the {c.obj} and said, "
        + p(f"\"Wow! Can I play with your {c.obj}, please?\"", f"\"What a nice {c.obj}! May I try it?\"")
        + f" But {h.name} did not want to share. \"{p('No, it is mine!', 'No! Go away!', 'It is only for me!')}\""
        + f" {h.he} said. {f.name} felt {p(*SAD)} and sat down alone {c.spots[0]}.",
        f"{h.name} played with the {c.obj} by {h.self_}, but it was not fun anymore. "
        + f"{h.He} looked at {f.name} and felt {p('bad', 'sorry', 'sad inside')}. "
        + f"Then {h.his} {c.helper} said, \""
        + p("Playing together is more fun than playing alone.", "When we share, everyone can smile.",
            "A toy is more fun with a friend.") + "\"",
        f"{h.name} walked to {f.name} and said, \"I am sorry. Do you want to play with my {c.obj}?\" "
        + f"{f.name} smiled. They {c.r.choice(TOGETHER)} all afternoon. "
        + p(f"{h.name} learned that sharing makes everyone happy, even {h.self_}.",
            f"From then on, {h.name} always shared {h.his} toys.",
            "Sharing made the day much better."),
    ]


FEARS = [  # name, when it comes, reassurance, brave act, discovery
    ("the dark", "One night, {his} room was very dark.", "the dark is just the room without the light",
     "opened {his} eyes and looked around", "{his} room looked the same as in the day"),
    ("thunder", "One evening, a big storm came and the thunder went boom!", "thunder is just the sound of clouds",
     "counted the seconds between the flashes", "the storm was moving far away"),
    ("the big slide", "One day, all the kids went down the big slide.", "you can hold on and go slowly",
     "climbed up the ladder and sat down at the top", "the slide was fast and fun"),
    ("the water", "One day, the family went to swim in the lake.", "you can keep your feet on the ground",
     "stepped into the water, one foot at a time", "the water was cool and nice"),
    ("the big dog next door", "One day, the big dog next door barked at the fence.",
     "the dog just wants to say hello", "held out {his} hand very slowly",
     "the dog licked {his} hand and wagged its tail"),
    ("bees", "One day, a bee buzzed around the flowers.", "bees are busy and do not want to hurt you",
     "stood still and watched the bee", "the bee only wanted the flowers"),
]


def _fear(c: _Ctx) -> list[str]:
    h, p = c.h, c.pick
    name, when, calm, act, found = (s.format(his=h.his) for s in c.r.choice(FEARS))
    return [
        f"{c.opening()} But {h.name} was afraid of {name}.",
        f"{when} {h.name} {p('hid under a blanket', 'ran to hide', 'held on to ' + h.his + ' ' + c.obj)}. "
        + f"\"{p('I do not like', 'I am scared of', 'Please make it stop, I hate')} {name},\" {h.he} "
        + p("whispered.", "said in a small voice.", "cried."),
        f"{h.His} {c.helper} sat down next to {h.him}. \"It is okay to be scared,\" {h.his} {c.helper} said. "
        + f"\"But {calm}.\" {h.name} took a deep breath. Then {h.he} {act}.",
        p(f"To {h.his} surprise, {found}.", f"Guess what? {_cap(found)}.", f"And then {found}.") + " "
        + f"It was not so scary after all! {h.name} felt {p('brave', 'proud', 'strong', 'happy')}. "
        + p(f"Now {h.name} is not afraid of {name} anymore.",
            "Being brave means trying, even when you are scared.",
            f"{h.He} learned that many scary things are not so scary when you look closely."),
    ]


STUCK = [  # where stuck, failed try, idea, how it worked
    ("up a tall tree", "reached up, but the branch was too high", "a long ladder",
     "climbed the ladder and carefully lifted {f} down"),
    ("in the thick mud", "pulled and pulled, but {f} did not move", "a long rope",
     "threw one end of the rope and pulled {f} out"),
    ("in a deep hole", "reached down, but {his} arm was too short", "a big stick",
     "held out the stick and {f} climbed up"),
    ("in a thorny bush", "tried to reach in, but the thorns were sharp", "a pair of thick gloves",
     "put on the gloves and gently freed {f}"),
    ("on a rock in the river", "called out, but the water was too fast", "a little wooden board",
     "laid the board across the water and {f} walked back"),
]


def _rescue(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    stuck, fail, tool, fix = c.r.choice(STUCK)
    fail, fix = fail.format(f=f.name, his=h.his), fix.format(f=f.name)
    return [
        f"{c.opening()} {h.His} best friend was {f.intro}.",
        f"One day, {h.name} and {f.name} went {c.to}. {c.weather()} "
        + f"Suddenly, {h.name} heard a cry. {f.name} was stuck {stuck}! "
        + f"\"{p('Help me', 'Help, help', 'Please help')}!\" {f.he} called.",
        f"{h.name} {fail}. {h.He} felt {p(*SAD)}, but {h.he} did not give up. "
        + p(f"Then {h.he} had an idea.", f"{h.He} thought and thought.", f"{h.He} looked around for something to help.")
        + f" {h.He} ran to get {tool} {p('from ' + h.his + ' ' + c.helper, 'from the shed', 'from home')}.",
        f"{h.name} {fix}. {f.name} was safe! \"Thank you for saving me!\" {f.name} said. "
        + p(f"{h.name} felt {p(*HAPPY)}. Friends always help each other.",
            f"They hugged, and {h.name} smiled. A good friend never gives up.",
            f"From that day on, {h.name} and {f.name} were the best of friends."),
    ]


PROJECTS = [  # what (no article), doing it, what went wrong, the better way
    ("sandcastle", "built walls and towers with wet sand", "a big wave came and knocked it down",
     "built it again, far from the water"),
    ("tall tower of blocks", "put one block on top of another", "the tower wobbled and fell with a crash",
     "put the big blocks at the bottom and the small ones on top"),
    ("cake for {helper}", "mixed flour, eggs and sugar in a bowl", "the cake came out flat and burned",
     "baked it again and watched the oven carefully"),
    ("kite", "cut paper and tied it to two sticks", "the kite would not fly and fell to the ground",
     "added a long tail made of ribbons"),
    ("picture for grandma", "painted a house and a tree", "a big drop of paint spilled on the paper",
     "turned the spill into a bright yellow sun"),
    ("snowman", "rolled three big balls of snow", "the head rolled off and broke",
     "packed the snow tight and made the head smaller"),
    ("little boat", "folded a paper boat", "the boat got wet and sank",
     "made a new boat out of wood and a leaf for a sail"),
]


def _making(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    what, doing, wrong, better = (s.format(helper=c.helper) for s in c.r.choice(PROJECTS))
    return [
        f"{c.opening()} One day, {h.name} wanted to make {_a(what)}.",
        f"{h.He} {doing}. {h.He} worked very hard. But then {wrong}. "
        + f"\"{p('Oh no', 'This is too hard', 'I will never do it')}!\" {h.name} said. {h.He} felt like crying.",
        f"{_cap(f.intro)} saw {h.him} and came over. \""
        + p("Let's try again together,", "Don't give up,", "I can help you,") + f"\" {f.name} said. "
        + f"So they {better}.",
        f"This time it worked! {h.name} and {f.name} looked at the {what} and {p('smiled', 'laughed', 'cheered')}. "
        + p(f"{h.name} learned that if you try again, you can do hard things.",
            "It is always better to try again than to give up.",
            f"{h.name} was proud, and {f.name} was proud too."),
    ]


RULES = [  # don't ..., or ..., what happened, how they fixed it
    ("play ball in the house", "you might break something",
     "the ball hit a pretty vase. Crash! It broke into many pieces", "glued the pieces back together"),
    ("go near the pond alone", "you might fall in",
     "{he} slipped on a wet stone and fell into the cold water. Splash", "dried {him} with a warm towel"),
    ("eat the cookies before dinner", "your tummy will hurt",
     "{he} ate five cookies and {his} tummy began to hurt", "made {him} a cup of warm tea"),
    ("climb the tall fence", "you might fall",
     "{he} fell down and hurt {his} knee", "put a bandage on the knee"),
    ("jump in the mud with your new shoes", "they will get dirty",
     "{his} new shoes were brown with mud", "washed the shoes together"),
]


def _warning(c: _Ctx) -> list[str]:
    h, p = c.h, c.pick
    dont, why, happened, fix = (s.format(he=h.he, him=h.him, his=h.his) for s in c.r.choice(RULES))
    return [
        f"{c.opening()} One day, {h.his} {c.helper} said, \"{h.name}, please do not {dont}, or {why}.\"",
        f"But {h.name} did not listen. "
        + p("It looked like so much fun.", "Nobody was watching.", f"{h.He} thought it would be okay.")
        + f" Then {happened}! {h.name} felt {p('scared', 'sorry', 'very sad')}.",
        f"{h.He} went to {h.his} {c.helper} and said, \"I am sorry. I did not listen.\" "
        + f"{h.His} {c.helper} gave {h.him} a hug and said, \""
        + p("Thank you for telling me the truth.", "It is okay. Everyone makes mistakes.",
            "I am glad you are safe.") + f"\" Together they {fix}.",
        p(f"From that day on, {h.name} always listened to {h.his} {c.helper}.",
          f"{h.name} learned that rules are there to keep us safe.",
          f"{h.name} learned to listen, and {h.he} never did it again."),
    ]


FINDS = [  # thing, what happened, the end
    ("a little white egg", "The egg began to crack. Out came a tiny baby bird!",
     "They took care of the bird until it could fly"),
    ("an old wooden box", "Inside the box were shiny buttons and a note that said, \"Be kind.\"",
     "They shared the buttons with all their friends"),
    ("a tiny door at the bottom of a tree", "A family of mice lived behind it and they waved hello!",
     "They came back every day to visit the mice"),
    ("a torn map", "The map showed a big X. Under the X was a box full of cookies!",
     "They ate the cookies and saved some for later"),
    ("a shiny key", "The key opened an old music box, and a sweet song began to play.",
     "They danced to the song until it was time for bed"),
    ("a lost puppy", "The puppy had a tag with a name on it. It was the neighbor's puppy!",
     "They brought the puppy home, and the neighbor gave them a big smile"),
]


def _discovery(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    thing, reveal, end = c.r.choice(FINDS)
    return [
        f"{c.opening()} One day, {h.name} went {c.to} with {f.intro}.",
        f"{c.weather()} As they walked, {h.name} saw something {c.spots[0]}. It was {thing}! "
        + f"\"{p('Look', 'Wow', 'Come here')}! What is this?\" {h.he} asked. {f.name} did not know.",
        f"They {p('looked at it closely', 'sat down to look at it', 'waited and watched')}. {reveal} "
        + f"{h.name} and {f.name} were very {p('surprised', 'excited', 'amazed')}.",
        f"{end}. " + p("It was the best day ever.", f"{h.name} would never forget that day.",
                       "Sometimes the best things are found when you are not looking for them."),
    ]


TROUBLES = [  # why the friend is sad, the gift, how it was made
    ("had a cold and had to stay in bed", "a card with a big red heart", "drew a heart and wrote \"Get well soon\""),
    ("was moving to a new town", "a bracelet made of beads", "put colorful beads on a string"),
    ("thought everyone forgot {his} birthday", "a small cake with one candle", "baked a cake with {helper}"),
    ("broke {his} favorite toy", "a new toy made of paper", "folded paper into a little bird"),
    ("felt lonely", "a bunch of flowers", "picked the prettiest flowers"),
]


def _kindness(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    why, gift, how = (s.format(his=f.his, helper=h.his + " " + c.helper) for s in c.r.choice(TROUBLES))
    return [
        f"{c.opening()} {h.His} friend was {f.intro}.",
        f"One day, {h.name} saw that {f.name} looked {p(*SAD)}. \"What is wrong?\" {h.name} asked. "
        + f"{f.name} said that {f.he} {why}.",
        f"{h.name} wanted to help. {h.He} thought, \""
        + p("I know what to do!", "I can make something nice.", "A gift will help.") + "\""
        + f" So {h.he} {how}. It was {gift}.",
        f"{h.name} gave {f.name} the gift. {f.name} smiled a big smile. "
        + f"\"Thank you, {h.name}! You are {p('the best friend', 'so kind', 'a good friend')}!\" {f.he} said. "
        + p(f"{h.name} felt warm inside. Being kind makes two people happy.",
            "A small gift can make a big smile.", f"{h.name} learned that kindness is the best gift of all."),
    ]


def _race(c: _Ctx) -> list[str]:
    h, f, p = c.h, c.f, c.pick
    goal = p("the big tree", "the old gate", "the red barn", "the top of the hill", "the pond")
    return [
        f"{c.opening()} {h.His} friend {f.name} the {f.noun} liked to run too.",
        f"One day, {h.name} and {f.name} were {c.where}. \"Let's have a race to {goal}!\" {f.name} said. "
        + f"\"Ready, set, go!\" They ran as fast as they could. {h.name} was winning.",
        f"Then {h.name} heard a {p('thump', 'cry', 'loud noise')}. {f.name} had tripped over a "
        + f"{p('rock', 'root', 'stick')} and fell down. {f.He} hurt {f.his} knee. "
        + f"{h.name} could win the race, but {h.he} stopped. \"Are you okay?\" {h.he} asked.",
        f"{h.name} helped {f.name} stand up. They walked to {goal} together, slowly. "
        + p("Nobody won the race, but they were both happy.", "They both got there at the same time.",
            "They laughed and said it was a tie.") + " "
        + p("Helping a friend is better than winning.", f"{h.name} learned that friends come first.",
            "Winning is fun, but being a good friend is better."),
    ]


def _rainy(c: _Ctx) -> list[str]:
    h, p = c.h, c.pick
    game = p("built a big fort with blankets and pillows", "made puppets out of old socks",
             "played a game of pretend pirates", "baked cookies shaped like stars")
    outside = "outside" if c.where in ("at home", "at school") else c.where
    return [
        f"{c.opening()} One morning, {h.name} wanted to play {outside}.",
        f"But when {h.he} looked out the window, it was raining. The rain went pitter-patter on the roof. "
        + f"\"{p('Oh no', 'Why does it have to rain', 'This is not fair')}!\" {h.name} said. {h.He} felt {p(*SAD)}.",
        f"{h.His} {c.helper} had an idea. \"Let's have fun inside,\" {h.his} {c.helper} said. "
        + f"So they {game}. {h.name} forgot all about the rain. "
        + f"{h.He} {p('laughed', 'smiled', 'giggled')} and had fun.",
        "Later, the rain stopped and a big rainbow came out. "
        + p(f"{h.name} learned that a rainy day can be a fun day too.",
            "Even a gray day can be full of fun.", f"{h.name} ran outside and said, \"What a wonderful day!\""),
    ]


TEMPLATES = [_lost, _sharing, _fear, _rescue, _making, _warning, _discovery, _kindness, _race, _rainy]


def generate_story(index: int, seed: int) -> str:
    """Story number ``index`` of the corpus for ``seed`` (paragraphs separated by single newlines)."""
    # a string seed is hashed with sha512 by random.Random: stable across runs and platforms
    r = random.Random(f"somoe-builtin-{seed}-{index}")
    c = _Ctx(r)
    return "\n".join(r.choice(TEMPLATES)(c))


def generate_stories(n: int, seed: int, start: int = 0) -> list[str]:
    """Stories ``start .. start+n-1`` of the deterministic built-in corpus for ``seed``.

    ``start`` lets the validation split continue right after the training split
    without generating the training stories again.
    """
    return [generate_story(i, seed) for i in range(start, start + n)]
